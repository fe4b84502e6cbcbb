"""The one device mesh: axes `data` x `member` over every device of every process.

A single CPU is a mesh of one; there is no separate single-device code path. `member` has size 1
(every device holds all of a --population's members) unless --member_devices spreads them.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MEMBER = "member"  # a --population's members over device groups (--member_devices)


def simulate_cpu_devices(n: int) -> None:
    """Split the host CPU into `n` devices; call before anything touches a device.

    Simulated devices are threads of one process: on a busy small machine one of them can reach
    a collective much later than the others, so XLA's 40 s CPU rendezvous abort is raised.
    """
    flag = "--xla_cpu_collective_call_terminate_timeout_seconds"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}=600").strip()
    jax.config.update("jax_num_cpu_devices", n)


# Measured here (benchmarks/throughput.py, 2-core CPU, jaxlib 0.10.2): XLA's CPU convolutions
# without YNN fusion of single convolutions made conv steps ~1.3-1.5x faster, SGD and NP alike.
# The option is experimental: XLA aborts on flags it does not know, so it is only added for the
# jaxlib series it was measured on (re-measure before extending CPU_CONV_FLAG_JAXLIB).
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CPU_CONV_FLAG_JAXLIB = ("0.10.",)


def tune_cpu_convolutions() -> bool:
    """Adds CPU_CONV_FLAG to XLA_FLAGS (a no-op for GPU and TPU backends) unless the user set
    that option or jaxlib is of an unmeasured series; call before jax starts. True if added."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags_now or not importlib.metadata.version(
        "jaxlib"
    ).startswith(CPU_CONV_FLAG_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = (flags_now + " " + CPU_CONV_FLAG).strip()
    return True


def machine(mesh) -> dict:
    """What the run ran on and how it was compiled, for config.json: the reproducibility claims
    (docs/design/distributed.md) depend on the platform, --deterministic and XLA's flags."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    return {
        "platform": mesh.devices.flat[0].platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": int(mesh.devices.size),
        "member_devices": int(mesh.shape[MEMBER]),  # a population's groups (--member_devices)
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "deterministic": DETERMINISTIC_FLAG in xla_flags,
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
        "xla_flags": xla_flags,
    }


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
AUTOTUNE_CACHE_FLAG = "--xla_gpu_per_fusion_autotune_cache_dir"


def reproducible_compilation(deterministic: bool, cache_dir: str) -> None:
    """--deterministic (XLA's deterministic GPU ops) and --compilation_cache_dir (jax's
    persistent cache of compiled programs, and XLA's of GPU autotuning results, in one folder
    every process shares: GPU autotuning is timed, so processes compiling on their own may pick
    different kernels). Call before jax starts; options already in XLA_FLAGS are kept."""
    added = []
    flags_now = os.environ.get("XLA_FLAGS", "")
    if deterministic and "xla_gpu_deterministic_ops" not in flags_now:
        added.append(DETERMINISTIC_FLAG)
    if cache_dir:
        cache_dir = os.path.abspath(cache_dir)
        if AUTOTUNE_CACHE_FLAG not in flags_now:
            added.append(f"{AUTOTUNE_CACHE_FLAG}={os.path.join(cache_dir, 'autotune')}")
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags_now, *added]).strip()


def make_mesh(devices=None, member_devices: int = 1) -> Mesh:
    """All devices by default (tests pass a subset to compare mesh shapes in one process), as
    (data, member) = (devices / M, M), M = `member_devices`. Device i sits at data position
    i // M: each data position's M member groups are consecutive devices of one process, so a
    process's devices hold a contiguous slice of the batch (as with M=1) and every member."""
    devices = jax.devices() if devices is None else list(devices)
    check_member_devices(member_devices, devices)
    # Auto axis types: eager ops on sharded batches work outside `jit` (docs/design/distributed.md).
    mesh = jax.make_mesh(
        (len(devices) // member_devices, member_devices),
        (DATA, MEMBER),
        axis_types=(AxisType.Auto,) * 2,
        devices=devices,
    )
    check_process_order(mesh.devices.flat)
    return mesh


def check_member_devices(m: int, devices) -> None:
    """One line if --member_devices=m cannot split `devices` into member groups, each inside one
    process (a group spanning processes would hold a batch slice that no one process feeds)."""
    n = len(devices)
    if m <= 0 or n % m:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(
            f"--member_devices={m} does not divide the {n} devices; use one of "
            f"{', '.join(map(str, divisors))}"
        )
    per_process = collections.Counter(d.process_index for d in devices)
    if any(k % m for k in per_process.values()):
        raise ValueError(
            f"--member_devices={m} does not divide each process's devices "
            f"({sorted(per_process.values())}); a member group must lie within one process"
        )


def data_size(mesh: Mesh) -> int:
    """The devices a batch is split over (the `data` axis): all of them unless --member_devices."""
    return mesh.shape[DATA]


def check_process_order(devices) -> None:
    """The mesh must hold each process's devices together and the processes in order.

    Process p feeds positions [p*b, (p+1)*b) of each global batch, and the NP noise key of an
    example is its position in the global batch; both agree only while mesh position follows
    process order. jax.make_mesh may reorder devices for the interconnect; if it ever put them
    out of process order, training would silently use other examples' noise.
    """
    order = [d.process_index for d in devices]
    if order != sorted(order):
        raise ValueError(
            f"the device mesh is not in process order (process of each mesh "
            f"position: {order}); global batch positions would not match the "
            f"processes' slices"
        )


def check_batch(global_batch: int, mesh: Mesh, what: str = "--batchsize") -> None:
    """Fail before anything compiles if the batch cannot be split evenly."""
    n_dev, n_proc = data_size(mesh), jax.process_count()
    groups = mesh.shape[MEMBER]
    if global_batch <= 0 or global_batch % n_dev:
        where = "devices of the mesh" + (
            f"'s data axis (--member_devices={groups})" if groups > 1 else ""
        )
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {n_dev} {where}; "
            f"use a multiple of {n_dev}"
            + (
                f" (e.g. {' or '.join(str(b) for b in _near_multiples(global_batch, n_dev))})"
                if global_batch > 0
                else ""
            )
        )
    if global_batch % n_proc:
        raise ValueError(f"{what}={global_batch} is not divisible by {n_proc} processes")


def _near_multiples(batch: int, n: int) -> list[int]:
    below = batch // n * n
    return [b for b in (below, below + n) if b > 0]


def round_up_batch(global_batch: int, mesh: Mesh) -> int:
    """The smallest multiple of the data axis's devices >= `global_batch` (for evaluation, whose
    padded last batch makes any batch size give the same result)."""
    n_dev = data_size(mesh)
    return -(-global_batch // n_dev) * n_dev


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def global_batch(mesh: Mesh, *local_arrays: np.ndarray, stacked: bool = False):
    """Assemble the global batch from each process's contiguous slice of it. `stacked`: K
    batches stacked on a leading axis (K, b, ...), each sharded as one batch."""
    sharding = NamedSharding(mesh, P(None, DATA)) if stacked else batch_sharding(mesh)
    if jax.process_count() == 1:  # the slice is the batch: one transfer call for all arrays
        return tuple(jax.device_put(local_arrays, sharding))  # (measured ~50 µs less a step)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in local_arrays)


def to_host(tree):
    """Numpy copies of `tree`'s arrays (metrics, a population's member marks and steps). A
    member-sharded array is not fully addressable with several processes, but make_mesh keeps
    every member on each process's devices, so it is assembled from this process's shards: no
    collective, as jax.device_get of a replicated array."""

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(jax.device_get(a))  # e.g. a solo run's step on several processes
        out = np.empty(a.shape, a.dtype)
        for shard in a.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
        return out

    return jax.tree.map(one, tree)


def serialize_if_multiprocess_cpu(fn):
    """On CPU with several processes, wait for each call of a jitted step before the next.

    Measured here (jax 0.10.2, gloo, 2 processes x 4 devices): when executions of a program with
    more than one cross-process all-reduce (e.g. a psum of float and int sums) are left to
    pipeline asynchronously, the processes sometimes deadlock in the all-reduce. Blocking on
    every result avoids it. GPU runs and single-process runs keep asynchronous dispatch.
    """
    if jax.process_count() == 1 or jax.devices()[0].platform != "cpu":
        return fn

    @functools.wraps(fn)
    def blocking(*args, **kwargs):
        return jax.block_until_ready(fn(*args, **kwargs))

    return blocking
