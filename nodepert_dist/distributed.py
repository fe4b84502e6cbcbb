"""Multi-process start-up: one call, `initialize()`, before anything touches a device.

Where the process layout comes from, first match wins:
  1. explicit settings: the flags `--coordinator_address --num_processes --process_id`, or, for
     any of them left unset, the env vars NODEPERT_COORDINATOR_ADDRESS / NODEPERT_NUM_PROCESSES /
     NODEPERT_PROCESS_ID (set by launch/local.py for whatever command it starts);
  2. the launcher that started the process (nodepert_dist/launchers.py, which reads nothing
     but the environment it is given): SLURM `srun`, Open MPI 4 and 5, MPICH/Intel MPI, PMIx,
     torchrun-style variables; it also fills whatever explicit settings leave out. Under SLURM
     the coordinator is the first host of SLURM_STEP_NODELIST on a port from SLURM_JOB_ID
     (jax's rule), process id/count = SLURM_PROCID / SLURM_NTASKS, one process per GPU (local
     rank r takes visible GPU r; a task the launcher bound GPUs to uses all it sees);
     `--slurm_tasks=per_node`: one process per node using all its GPUs. A launcher that does
     not say where process 0 is (Open MPI 5, MPICH, PMIx) stops the run with one line naming
     the flags to add, never a silent single-process run of every rank. Then jax's own
     detection of other clusters (Kubernetes, Cloud TPU). It runs here, before `initialize`,
     so the layout can be logged and the coordinator checked with our timeouts;
  3. nothing: a single process, `jax.distributed` is not started.

A peer that never shows up is not a Python exception in jax: the process aborts once the
initialisation timeout passes. We therefore (a) check that a non-zero rank can reach the
coordinator's TCP port at all, and (b) run a watchdog that prints a one-line error and exits
with status 3 when `jax.distributed.initialize` has not returned after `--init_timeout_s`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

from absl import flags, logging

from nodepert_dist import launchers

ENV_COORDINATOR = "NODEPERT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NODEPERT_NUM_PROCESSES"
ENV_PROCESS_ID = "NODEPERT_PROCESS_ID"
SLURM_TASKS = ("per_gpu", "per_node")
INIT_TIMEOUT_EXIT_CODE = 3

flags.DEFINE_string(
    "coordinator_address",
    None,
    f"HOST:PORT or [IPv6]:PORT of process 0's coordinator (env {ENV_COORDINATOR}); "
    "detected under SLURM srun, Open MPI 4 mpirun, torchrun, Kubernetes.",
)
flags.DEFINE_integer("num_processes", None, f"Processes in the job (env {ENV_NUM_PROCESSES}).")
flags.DEFINE_integer("process_id", None, f"This process's rank, 0-based (env {ENV_PROCESS_ID}).")
flags.DEFINE_enum(
    "slurm_tasks",
    "per_gpu",
    list(SLURM_TASKS),
    "Under a launcher (SLURM, MPI, torchrun): one task per GPU (default) or one task "
    "per node using all its GPUs.",
)
flags.DEFINE_integer(
    "expected_devices",
    0,
    "Fail at start-up unless the job sees exactly this many devices (0: no check).",
)
flags.DEFINE_bool(
    "require_gpu",
    False,
    "Fail at start-up unless jax runs on GPUs (a CPU-only jax or a missing driver would "
    "otherwise train on the CPU).",
)
flags.DEFINE_integer("init_timeout_s", 300, "Seconds to wait for all processes to join.")


class DistributedError(RuntimeError):
    """A bad or unreachable process layout; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Who this process is. `source`: 'flags', 'env', a launcher ('slurm', 'ompi', 'torchrun',
    ...; 'flags+ompi5' when the launcher filled in what the flags left out) or 'single'."""

    source: str
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: every device the process sees

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


# ----------------------------------------------------------------------------- detection


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    slurm_tasks: str = "per_gpu",
    env: Mapping[str, str] | None = None,
) -> Layout:
    """The layout from explicit values, then NODEPERT_* env vars, then the launcher that started
    this process (nodepert_dist/launchers.py; it also fills what explicit values leave out), then
    jax's other cluster detection (Kubernetes, Cloud TPU), else a single process. With `env`,
    nothing but `env` is read."""
    if slurm_tasks not in SLURM_TASKS:
        raise DistributedError(
            f"--slurm_tasks={slurm_tasks!r} is not one of {', '.join(SLURM_TASKS)}"
        )
    environ = os.environ if env is None else env
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    source = "flags" if any(v is not None for v in given.values()) else None
    from_env = {
        "coordinator_address": environ.get(ENV_COORDINATOR),
        "num_processes": environ.get(ENV_NUM_PROCESSES),
        "process_id": environ.get(ENV_PROCESS_ID),
    }
    if any(v for v in from_env.values()):
        source = source or "env"
        for k, v in from_env.items():
            if given[k] is None and v:
                given[k] = v
    for k in ("num_processes", "process_id"):
        if given[k] is not None:
            try:
                given[k] = int(given[k])
            except ValueError:
                raise DistributedError(
                    f"--{k} (or NODEPERT_{k.upper()}) = {given[k]!r} is not an integer"
                ) from None
    if source is not None and given["num_processes"] == 1 and given["process_id"] in (None, 0):
        return Layout(source)
    try:
        if source is not None and None not in given.values():
            return _explicit(source, given)
        launch = launchers.choose(launchers.find(environ))
    except launchers.LauncherError as e:
        raise DistributedError(str(e)) from None
    if launch is None:
        if source is not None:
            missing = [k for k, v in given.items() if v is None]
            raise DistributedError(
                f"incomplete process layout from {source}: set --{' --'.join(missing)} "
                f"(or {', '.join('NODEPERT_' + m.upper() for m in missing)})"
            )
        return _jax_cluster(slurm_tasks) if env is None else Layout("single")
    # The launcher supplies whatever was not given explicitly.
    from_launcher = {
        "coordinator_address": launch.coordinator,
        "num_processes": launch.num_processes,
        "process_id": launch.process_id,
    }
    filled = {k: v if v is not None else from_launcher[k] for k, v in given.items()}
    if filled["num_processes"] == 1:
        return Layout(launch.name if source is None else source)
    if None in filled.values():
        raise DistributedError(_unusable(launch, [k for k, v in filled.items() if v is None]))
    name = launch.name if source is None else f"{source}+{launch.name}"
    bind = given["num_processes"] is None or given["process_id"] is None  # the launcher's ranks
    local_ids = launchers.gpu_binding(launch, environ, slurm_tasks == "per_node") if bind else None
    return _checked(
        Layout(
            name,
            filled["num_processes"],
            filled["process_id"],
            str(filled["coordinator_address"]),
            local_ids,
        )
    )


def _explicit(source: str, given: dict) -> Layout:
    return _checked(
        Layout(
            source, given["num_processes"], given["process_id"], str(given["coordinator_address"])
        )
    )


def _unusable(launch: launchers.Launch, missing: list[str]) -> str:
    """One line: the launcher found, what it does not say, the flags that say it."""
    of = "an unknown number" if launch.num_processes is None else str(launch.num_processes)
    lacks = {
        "coordinator_address": "where process 0's coordinator is",
        "num_processes": "how many processes there are",
        "process_id": "this process's rank",
    }
    need = {
        "coordinator_address": "--coordinator_address=HOST:PORT",
        "num_processes": "--num_processes=N",
        "process_id": "--process_id=RANK",
    }
    env_names = ", ".join("NODEPERT_" + m.upper() for m in missing)
    return (
        f"{launch.label} started this as process {launch.process_id} of {of} "
        f"({launch.evidence}) but does not say {' or '.join(lacks[m] for m in missing)}: "
        f"pass {' '.join(need[m] for m in missing)} (or env {env_names}; HOST is process 0's "
        f"host, PORT a free port there) and the rest comes from {launch.label}"
    )


def _jax_cluster(slurm_tasks: str) -> Layout:
    """jax's detection of the clusters launchers.py does not read (Kubernetes, Cloud TPU), for
    this process's own environment only: jax's ClusterEnv classes read os.environ and metadata
    servers."""
    from jax._src import clusters  # what jax.distributed.initialize() itself uses

    found = next(
        (
            c
            for c in clusters.ClusterEnv._cluster_types
            if not c.opt_in_only_method and c.name not in ("slurm", "ompi") and c.is_env_present()
        ),
        None,
    )
    if found is None:
        return Layout("single")
    name = found.name or found.__name__
    try:
        address, num, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, found.name or None, 300
        )  # s to look the coordinator up
    except (KeyError, ValueError, RuntimeError) as e:
        raise DistributedError(f"{found.__name__} environment found but incomplete: {e}") from None
    if int(num) <= 1:
        return Layout(name)
    launch = launchers.Launch(
        name, found.__name__, name, int(pid), int(num), local_ids[0] if local_ids else None, address
    )
    return _checked(
        Layout(
            name,
            int(num),
            int(pid),
            address,
            launchers.gpu_binding(launch, os.environ, slurm_tasks == "per_node"),
        )
    )


def _checked(layout: Layout) -> Layout:
    if layout.num_processes < 1:
        raise DistributedError(f"num_processes={layout.num_processes} must be >= 1")
    if not 0 <= layout.process_id < layout.num_processes:
        raise DistributedError(
            f"process_id={layout.process_id} is outside 0..{layout.num_processes - 1}"
        )
    try:
        launchers.split_address(layout.coordinator_address)
    except launchers.LauncherError as e:
        raise DistributedError(f"{e}; pass --coordinator_address=HOST:PORT") from None
    return layout


# ----------------------------------------------------------------------------- start-up


def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Non-zero ranks: fail with one line unless the coordinator's port accepts a TCP connection."""
    host, port = launchers.split_address(address)
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"no coordinator answered at {address} within the init timeout ({last}); "
                f"is process 0 running there, and do all processes use the same address?"
            )
        time.sleep(0.25)


def _watchdog(layout: Layout, wait_s: float, timeout_s: float) -> threading.Event:
    """Exit with one line if start-up is not done after `wait_s` (what is left of --init_timeout_s)."""
    done = threading.Event()

    def fire():
        if not done.wait(wait_s):
            sys.stderr.write(
                f"error: process {layout.process_id}/{layout.num_processes}: not all "
                f"{layout.num_processes} processes joined the coordinator at "
                f"{layout.coordinator_address} within {timeout_s:g} s (--init_timeout_s)\n"
            )
            sys.stderr.flush()
            os._exit(INIT_TIMEOUT_EXIT_CODE)

    threading.Thread(target=fire, daemon=True, name="init-watchdog").start()
    return done


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    slurm_tasks: str = "per_gpu",
    init_timeout_s: float = 300,
    expected_devices: int = 0,
    require_gpu: bool = False,
    env: Mapping[str, str] | None = None,
) -> Layout:
    """Detects the layout, starts jax.distributed if there is more than one process, logs what it
    found and checks the device count. Call it once, before anything touches a device."""
    import jax  # noqa: F401  (imported here so the pure helpers above stay cheap to test)

    layout = detect(
        coordinator_address, num_processes, process_id, slurm_tasks=slurm_tasks, env=env
    )
    if layout.multi_process:
        logging.info(
            "distributed: process %d of %d from %s, coordinator %s, local devices %s; "
            "waiting up to %gs for all processes",
            layout.process_id,
            layout.num_processes,
            layout.source,
            layout.coordinator_address,
            "all" if layout.local_device_ids is None else list(layout.local_device_ids),
            init_timeout_s,
        )
        start = time.monotonic()
        deadline = start + init_timeout_s
        if layout.process_id != 0:
            _wait_for_coordinator(layout.coordinator_address, deadline)
        done = _watchdog(layout, max(1.0, deadline - time.monotonic()), init_timeout_s)
        # jax's own timeout a little later than the watchdog, so our one-line error wins. The
        # layout is complete (from flags/env, or from jax's own ClusterEnv detection above), so
        # jax must not detect again: it would give a per-node process only GPU 0.
        jax.distributed.initialize(
            coordinator_address=layout.coordinator_address,
            num_processes=layout.num_processes,
            process_id=layout.process_id,
            local_device_ids=None
            if layout.local_device_ids is None
            else list(layout.local_device_ids),
            initialization_timeout=int(init_timeout_s) + 30,
            cluster_detection_method="deactivate",
        )
        done.set()
        logging.info("distributed: joined in %.1fs", time.monotonic() - start)
    n_global, n_local = jax.device_count(), jax.local_device_count()
    logging.info(
        "devices: process %d of %d (%s), %d local, %d global: %s",
        jax.process_index(),
        jax.process_count(),
        layout.source,
        n_local,
        n_global,
        ", ".join(str(d) for d in jax.local_devices()),
    )
    if require_gpu and jax.default_backend() != "gpu":
        raise DistributedError(
            f"--require_gpu, but jax runs on {jax.default_backend()} ({jax.devices()[0]}): "
            f"install the GPU build (pip install -e '.[cuda12]') on a node with NVIDIA GPUs "
            f"and a driver, or drop --require_gpu"
        )
    if expected_devices and n_global != expected_devices:
        raise DistributedError(
            f"expected {expected_devices} devices (--expected_devices) but the job sees {n_global} "
            f"({n_local} local x {jax.process_count()} processes, platform "
            f"{jax.devices()[0].platform})"
        )
    return layout


def initialize_from_flags(env: Mapping[str, str] | None = None) -> Layout:
    """`initialize()` with this module's absl flags (after they are parsed)."""
    f = flags.FLAGS
    return initialize(
        f.coordinator_address,
        f.num_processes,
        f.process_id,
        slurm_tasks=f.slurm_tasks,
        init_timeout_s=f.init_timeout_s,
        expected_devices=f.expected_devices,
        require_gpu=f.require_gpu,
        env=env,
    )
