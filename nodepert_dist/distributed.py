"""Multi-process start-up: one call, `initialize()`, before anything touches a device.

Where the process layout comes from, first match wins:
  1. explicit settings: the flags `--coordinator_address --num_processes --process_id`, or, for
     any of them left unset, the env vars NODEPERT_COORDINATOR_ADDRESS / NODEPERT_NUM_PROCESSES /
     NODEPERT_PROCESS_ID (set by launch/local.py for whatever command it starts);
  2. jax.distributed's own cluster detection (`jax._src.clusters`: SLURM inside `srun`, Open
     MPI's `mpirun`, Kubernetes, Cloud TPU), the same code `jax.distributed.initialize()` runs
     with no arguments: e.g. under SLURM the coordinator is the first host of
     SLURM_STEP_NODELIST on a port derived from SLURM_JOB_ID, process id/count = SLURM_PROCID /
     SLURM_NTASKS, one process per GPU (GPU = SLURM_LOCALID; device 0 when the scheduler bound
     a single GPU to the task); `--slurm_tasks=per_node`: one process per node using all its
     GPUs. It runs here, before `initialize`, so the layout can be logged and the coordinator
     checked with our timeouts;
  3. nothing: a single process, `jax.distributed` is not started.

A peer that never shows up is not a Python exception in jax: the process aborts once the
initialisation timeout passes. We therefore (a) check that a non-zero rank can reach the
coordinator's TCP port at all, and (b) run a watchdog that prints a one-line error and exits
with status 3 when `jax.distributed.initialize` has not returned after `--init_timeout_s`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Mapping, Optional
from unittest import mock

from absl import flags, logging

ENV_COORDINATOR = "NODEPERT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NODEPERT_NUM_PROCESSES"
ENV_PROCESS_ID = "NODEPERT_PROCESS_ID"
SLURM_TASKS = ("per_gpu", "per_node")
INIT_TIMEOUT_EXIT_CODE = 3

flags.DEFINE_string("coordinator_address", None,
                    f"host:port of process 0's coordinator (env {ENV_COORDINATOR}; SLURM, Open MPI, "
                    "Kubernetes: detected by jax).")
flags.DEFINE_integer("num_processes", None, f"Processes in the job (env {ENV_NUM_PROCESSES}).")
flags.DEFINE_integer("process_id", None, f"This process's rank, 0-based (env {ENV_PROCESS_ID}).")
flags.DEFINE_enum("slurm_tasks", "per_gpu", list(SLURM_TASKS),
                  "Under SLURM: one task per GPU (default) or one task per node using all its GPUs.")
flags.DEFINE_integer("expected_devices", 0,
                     "Fail at start-up unless the job sees exactly this many devices (0: no check).")
flags.DEFINE_integer("init_timeout_s", 300, "Seconds to wait for all processes to join.")


class DistributedError(RuntimeError):
    """A bad or unreachable process layout; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Who this process is. `source`: 'flags', 'env', a jax cluster name ('slurm', 'ompi', ...)
    or 'single'."""
    source: str
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: Optional[str] = None
    local_device_ids: Optional[tuple[int, ...]] = None  # None: every device the process sees

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


# ----------------------------------------------------------------------------- detection

def cluster_layout(slurm_tasks: str = "per_gpu", env: Optional[Mapping[str, str]] = None,
                   timeout_s: int = 300) -> Optional[Layout]:
    """The layout jax.distributed's own cluster detection finds (SLURM under srun, Open MPI,
    Kubernetes, Cloud TPU; `jax._src.clusters`), or None outside any cluster.

    jax's ClusterEnv classes read os.environ; an explicit `env` (tests) stands in for it.
    """
    from jax._src import clusters  # what jax.distributed.initialize() itself uses

    if slurm_tasks not in SLURM_TASKS:
        raise DistributedError(f"--slurm_tasks={slurm_tasks!r} is not one of {', '.join(SLURM_TASKS)}")
    with mock.patch.dict(os.environ, env, clear=True) if env is not None else _nothing():
        found = next((c for c in clusters.ClusterEnv._cluster_types
                      if not c.opt_in_only_method and c.is_env_present()), None)
        if found is None:
            return None
        try:
            address, num, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, found.name or None, timeout_s)
        except (KeyError, ValueError, RuntimeError) as e:
            raise DistributedError(f"{found.__name__} environment found but incomplete: {e}") from None
        name = found.name or found.__name__
        if name == "slurm" and slurm_tasks == "per_node":
            local_ids = None  # one process uses every GPU of its node
        elif local_ids is not None and len(_gpu_list(os.environ.get("CUDA_VISIBLE_DEVICES")) or []) == 1:
            # jax takes the task's local rank as its GPU; if the scheduler bound one GPU to the
            # task (SLURM --gpus-per-task=1 / --gpu-bind), that GPU is device 0 of what it sees.
            local_ids = [0]
    return Layout(name, num_processes=int(num), process_id=int(pid), coordinator_address=address,
                  local_device_ids=None if local_ids is None else tuple(local_ids))


@contextlib.contextmanager
def _nothing():
    yield


def _gpu_list(value: Optional[str]) -> Optional[list[str]]:
    """'0,1,3' -> ['0','1','3']; None or '' (or SLURM's 'NoDevFiles') -> None."""
    if not value or value.strip() in ("", "NoDevFiles"):
        return None
    return [v for v in value.split(",") if v.strip()]


def detect(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None, *, slurm_tasks: str = "per_gpu",
           env: Optional[Mapping[str, str]] = None) -> Layout:
    """The layout from explicit values, then NODEPERT_* env vars, then jax's cluster detection,
    else a single process."""
    environ = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    source = "flags" if any(v is not None for v in given.values()) else None
    from_env = {"coordinator_address": environ.get(ENV_COORDINATOR),
                "num_processes": environ.get(ENV_NUM_PROCESSES), "process_id": environ.get(ENV_PROCESS_ID)}
    if any(v for v in from_env.values()):
        source = source or "env"
        for k, v in from_env.items():
            if given[k] is None and v:
                given[k] = v
    if source is not None:
        missing = [k for k, v in given.items() if v is None]
        num = int(given["num_processes"]) if given["num_processes"] is not None else None
        if num == 1 and given["process_id"] in (None, 0, "0"):
            return Layout(source)
        if missing:
            raise DistributedError(
                f"incomplete process layout from {source}: set --{' --'.join(missing)} "
                f"(or {', '.join('NODEPERT_' + m.upper() for m in missing)})")
        return _checked(Layout(source, num_processes=num, process_id=int(given["process_id"]),
                               coordinator_address=str(given["coordinator_address"])))
    cluster = cluster_layout(slurm_tasks, env)
    if cluster is not None:
        return _checked(cluster) if cluster.multi_process else Layout(cluster.source)
    return Layout("single")


def _checked(layout: Layout) -> Layout:
    if layout.num_processes < 1:
        raise DistributedError(f"num_processes={layout.num_processes} must be >= 1")
    if not 0 <= layout.process_id < layout.num_processes:
        raise DistributedError(f"process_id={layout.process_id} is outside 0..{layout.num_processes - 1}")
    host, _, port = (layout.coordinator_address or "").rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {layout.coordinator_address!r} is not host:port")
    return layout


# ----------------------------------------------------------------------------- start-up

def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Non-zero ranks: fail with one line unless the coordinator's port accepts a TCP connection."""
    host, _, port = address.rpartition(":")
    last = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"no coordinator answered at {address} within the init timeout ({last}); "
                f"is process 0 running there, and do all processes use the same address?")
        time.sleep(0.25)


def _watchdog(layout: Layout, timeout_s: float) -> threading.Event:
    done = threading.Event()

    def fire():
        if not done.wait(timeout_s):
            sys.stderr.write(
                f"error: process {layout.process_id}/{layout.num_processes}: not all "
                f"{layout.num_processes} processes joined the coordinator at "
                f"{layout.coordinator_address} within {timeout_s:g} s (--init_timeout_s)\n")
            sys.stderr.flush()
            os._exit(INIT_TIMEOUT_EXIT_CODE)

    threading.Thread(target=fire, daemon=True, name="init-watchdog").start()
    return done


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, slurm_tasks: str = "per_gpu",
               init_timeout_s: float = 300, expected_devices: int = 0,
               env: Optional[Mapping[str, str]] = None) -> Layout:
    """Detects the layout, starts jax.distributed if there is more than one process, logs what it
    found and checks the device count. Call it once, before anything touches a device."""
    import jax  # noqa: F401  (imported here so the pure helpers above stay cheap to test)

    layout = detect(coordinator_address, num_processes, process_id, slurm_tasks=slurm_tasks,
                    env=env)
    if layout.multi_process:
        logging.info("distributed: process %d of %d from %s, coordinator %s, local devices %s; "
                     "waiting up to %gs for all processes", layout.process_id,
                     layout.num_processes, layout.source, layout.coordinator_address,
                     "all" if layout.local_device_ids is None else list(layout.local_device_ids),
                     init_timeout_s)
        start = time.monotonic()
        deadline = start + init_timeout_s
        if layout.process_id != 0:
            _wait_for_coordinator(layout.coordinator_address, deadline)
        done = _watchdog(layout, max(1.0, deadline - time.monotonic()))
        # jax's own timeout a little later than the watchdog, so our one-line error wins. The
        # layout is complete (from flags/env, or from jax's own ClusterEnv detection above), so
        # jax must not detect again: it would give a per-node process only GPU 0.
        jax.distributed.initialize(
            coordinator_address=layout.coordinator_address, num_processes=layout.num_processes,
            process_id=layout.process_id,
            local_device_ids=None if layout.local_device_ids is None else list(layout.local_device_ids),
            initialization_timeout=int(init_timeout_s) + 30,
            cluster_detection_method="deactivate")
        done.set()
        logging.info("distributed: joined in %.1fs", time.monotonic() - start)
    n_global, n_local = jax.device_count(), jax.local_device_count()
    logging.info("devices: process %d of %d (%s), %d local, %d global: %s", jax.process_index(),
                 jax.process_count(), layout.source, n_local, n_global,
                 ", ".join(str(d) for d in jax.local_devices()))
    if expected_devices and n_global != expected_devices:
        raise DistributedError(
            f"expected {expected_devices} devices (--expected_devices) but the job sees {n_global} "
            f"({n_local} local x {jax.process_count()} processes, platform "
            f"{jax.devices()[0].platform})")
    return layout


def initialize_from_flags(env: Optional[Mapping[str, str]] = None) -> Layout:
    """`initialize()` with this module's absl flags (after they are parsed)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id,
                      slurm_tasks=f.slurm_tasks, init_timeout_s=f.init_timeout_s,
                      expected_devices=f.expected_devices, env=env)
