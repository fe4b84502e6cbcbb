"""Which multi-process launcher started this process, read from an environment mapping alone.

Every reader takes the environment it is given (never `os.environ` itself) and returns a
`Launch`, or None when its launcher is absent. Innermost launcher first: one started inside
another (`srun torchrun ...`, `mpirun` inside an sbatch allocation) sets its variables on top of
the outer one's, and the innermost one names the real processes.

  torchrun-style   RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT (torchrun, PyTorchJob, ...)
  Open MPI 4       OMPI_MCA_orte_hnp_uri (mpirun's address) + OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK
  Open MPI 5       OMPI_COMM_WORLD_* under PRRTE/PMIx, no URI: rank and size, no coordinator
  MPICH, Intel MPI PMI_RANK PMI_SIZE MPI_LOCALRANKID (Hydra): rank and size, no coordinator
  PMIx             PMIX_RANK: a rank only
  SLURM srun       SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID

The coordinator rules follow jax's own (`jax._src.clusters`) where jax has one: SLURM, the first
host of the step's node list on port 61440 + job id % 4096; Open MPI 4, mpirun's host on a port
from its job id; JAX_COORDINATOR_PORT overrides either port. Hostlists are expanded by
python-hostlist, which knows every form SLURM writes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping

import hostlist

from nodepert_dist.gpus import visible_gpus

PORT_BASE = 65536 - 4096  # jax's rule: jobs spread over the top 4096 ports


class LauncherError(ValueError):
    """The launcher's environment cannot be used as it is; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """What one launcher says about this process. `coordinator`: host:port or None when the
    launcher does not say where process 0 is; `num_processes` None when it does not say how many;
    `gpus_per_task`: the launcher bound a set of GPUs to this task (SLURM --gpus-per-task)."""

    name: str
    label: str  # for messages: "Open MPI 5 (PRRTE/PMIx)"
    evidence: str  # the variables it was recognised by
    process_id: int
    num_processes: int | None
    local_rank: int | None = None
    coordinator: str | None = None
    gpus_per_task: bool = False


# ----------------------------------------------------------------------------- addresses


def join_address(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets ([fe80::1%eth0]:1234) as gRPC and jax need."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[IPv6]:port' -> (host, port); LauncherError for anything a peer could not
    connect to (no port, unbracketed or invalid IPv6, a port outside 1..65535, spaces)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", address or "")
    why = None
    if m is None:
        why = "is not HOST:PORT (an IPv6 address in brackets: [ADDR]:PORT)"
    else:
        host, port = (
            (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        )
        if not 0 < int(port) < 65536:
            why = f"has port {port}, outside 1..65535"
        elif m.group(1) is not None:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                why = f"has {host!r} in brackets, which is not an IPv6 address"
        elif not _HOSTNAME.match(host):
            why = f"has {host!r}, which is not a host name or IPv4 address"
    if why:
        raise LauncherError(f"coordinator address {address!r} {why}")
    return host, int(port)


def _port(env: Mapping[str, str], default: int) -> int:
    override = env.get("JAX_COORDINATOR_PORT")  # jax.distributed's own override
    if override:
        if not override.isdigit():
            raise LauncherError(f"JAX_COORDINATOR_PORT={override!r} is not a port number")
        return int(override)
    return default


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise LauncherError(f"{name} is not set, though other variables of its launcher are")
    try:
        return int(value)
    except ValueError:
        raise LauncherError(f"{name}={value!r} is not an integer") from None


def _opt_int(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name) if env.get(name, "") != "" else None


# ----------------------------------------------------------------------------- launchers


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'machine2-[3-5]-vm1' -> 'machine2-3-vm1',
    'r[1-2]-n[07-08],login' -> 'r1-n07' (text after a range, several ranges in one name, comma
    lists of mixed forms, zero padding kept)."""
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as e:
        raise LauncherError(f"SLURM_STEP_NODELIST={nodelist!r} is not a hostlist ({e})") from None
    if not hosts:
        raise LauncherError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
    return hosts[0]


def slurm(env: Mapping[str, str]) -> Launch | None:
    needed = (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    )
    if not all(k in env for k in needed):
        return None  # e.g. the batch script itself, outside srun: one process
    port = _port(env, PORT_BASE + _int(env, "SLURM_JOB_ID") % 4096)
    return Launch(
        "slurm",
        "SLURM srun",
        "SLURM_PROCID/SLURM_NTASKS",
        _int(env, "SLURM_PROCID"),
        _int(env, "SLURM_NTASKS"),
        _int(env, "SLURM_LOCALID"),
        join_address(first_host(env["SLURM_STEP_NODELIST"]), port),
        gpus_per_task=bool(env.get("SLURM_GPUS_PER_TASK")),
    )


def ompi_coordinator_host(uri: str) -> str:
    """mpirun's first usable address in an ORTE URI, IPv4 before IPv6:
    '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911' -> '10.96.0.1',
    '1314521088.0;tcp6://[fe80::b9b:ac5d,2620:10d:c083::2]:43370' -> '2620:10d:c083::2'
    (a link-local address without its interface cannot be reached from another host)."""
    found = []
    for kind, body in re.findall(r"(tcp6?)://(\[[^\]]*\]|[^:;]*)", uri):
        found += [(kind, a.strip()) for a in body.strip("[]").split(",") if a.strip()]
    for kind in ("tcp", "tcp6"):
        for k, addr in found:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                continue
            if k == kind and not ip.is_unspecified and not (ip.is_link_local and "%" not in addr):
                return addr
    raise LauncherError(
        f"OMPI_MCA_orte_hnp_uri={uri!r} has no address another host can reach; "
        f"pass --coordinator_address=HOST:PORT (rank 0's host)"
    )


def open_mpi(env: Mapping[str, str]) -> Launch | None:
    if "OMPI_COMM_WORLD_SIZE" not in env and "OMPI_MCA_orte_hnp_uri" not in env:
        return None
    rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local = _opt_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    uri = env.get("OMPI_MCA_orte_hnp_uri")
    if uri is None:  # Open MPI 5: PRRTE passes no address of mpirun's host
        return Launch(
            "ompi5", "Open MPI 5 (PRRTE/PMIx)", "OMPI_COMM_WORLD_SIZE/RANK", rank, size, local
        )
    job_id = uri.split(".", 1)[0]
    if not job_id.isdigit():
        raise LauncherError(f"OMPI_MCA_orte_hnp_uri={uri!r} does not start with a job id")
    port = _port(env, PORT_BASE + int(job_id) // 4096 % 4096)  # ORTE job ids are multiples of 4096
    return Launch(
        "ompi",
        "Open MPI 4 (mpirun)",
        "OMPI_MCA_orte_hnp_uri",
        rank,
        size,
        local,
        join_address(ompi_coordinator_host(uri), port),
    )


def hydra_pmi(env: Mapping[str, str]) -> Launch | None:
    if "PMI_RANK" not in env or "PMI_SIZE" not in env:
        return None
    return Launch(
        "pmi",
        "MPICH/Intel MPI (Hydra PMI)",
        "PMI_RANK/PMI_SIZE",
        _int(env, "PMI_RANK"),
        _int(env, "PMI_SIZE"),
        _opt_int(env, "MPI_LOCALRANKID"),
    )


def pmix(env: Mapping[str, str]) -> Launch | None:
    if "PMIX_RANK" not in env:
        return None
    return Launch("pmix", "PMIx", "PMIX_RANK", _int(env, "PMIX_RANK"), None)


def torchrun(env: Mapping[str, str]) -> Launch | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    coordinator = None
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        # MASTER_PORT is the port rank 0's host keeps for the job's rendezvous server; when
        # torchrun's agent serves its own store there (TORCHELASTIC_USE_AGENT_STORE), take the next.
        port = _int(env, "MASTER_PORT") + (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        coordinator = join_address(env["MASTER_ADDR"].strip("[]"), _port(env, port))
    return Launch(
        "torchrun",
        "torchrun-style",
        "RANK/WORLD_SIZE",
        rank,
        size,
        _opt_int(env, "LOCAL_RANK"),
        coordinator,
    )


READERS: tuple[Callable[[Mapping[str, str]], Launch | None], ...] = (
    torchrun,
    open_mpi,
    hydra_pmi,
    pmix,
    slurm,
)  # innermost first


def find(env: Mapping[str, str]) -> list[Launch]:
    """Every launcher whose variables are in `env`, innermost first."""
    return [launch for read in READERS if (launch := read(env)) is not None]


def choose(launches: list[Launch]) -> Launch | None:
    """The innermost launcher, completed by an outer one that started the same processes (e.g.
    `srun --mpi=pmix` sets SLURM's variables and PMIx's for one task): same rank, and the same
    size where both say. None when no launcher is present."""
    if not launches:
        return None
    inner = launches[0]
    if inner.coordinator is not None and inner.num_processes is not None:
        return inner
    for outer in launches[1:]:
        if (
            outer.coordinator is not None
            and outer.process_id == inner.process_id
            and inner.num_processes in (None, outer.num_processes)
        ):
            return outer
    return inner


# ----------------------------------------------------------------------------- GPUs


def gpu_binding(launch: Launch, env: Mapping[str, str], per_node: bool) -> tuple[int, ...] | None:
    """Local device ids (positions among the GPUs the process sees) for one process per GPU;
    None: every device it sees. A task the launcher bound GPUs to (one visible, fewer visible
    than its local rank, SLURM --gpus-per-task) uses all of them; otherwise local rank r takes
    visible GPU r, as jax does."""
    if per_node or launch.local_rank is None:
        return None
    visible = visible_gpus(env)
    if visible is None:
        return None if launch.gpus_per_task else (launch.local_rank,)
    if not visible:
        return None  # no GPU visible: nothing to bind
    if launch.gpus_per_task or len(visible) == 1 or launch.local_rank >= len(visible):
        return tuple(range(len(visible)))
    return (launch.local_rank,)
