"""The GPUs of this machine and how the local launchers share them among child processes.

Several processes on one node that each see every GPU each preallocate 75% of every GPU's
memory, and NCCL refuses two ranks of one job on one GPU. So launch/local.py (the ranks of one
job), `launch/sweep.py --mode=local --parallel=N` and the experiments' local runs (concurrent
runs) give each child its own GPUs through CUDA_VISIBLE_DEVICES, round-robin over the GPUs the
launcher sees, and a share of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION) when children must
share a GPU. Standard library only: launch/local.py and the sweep import it without jax.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

VISIBLE = "CUDA_VISIBLE_DEVICES"
MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
USABLE_MEMORY = 0.9  # of a GPU shared by several children, split evenly among them


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPUs this process can see (indices or UUIDs), or None when nothing restricts them."""
    for name in (VISIBLE, "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        value = env.get(name)
        if value is not None and value.strip() != "NoDevFiles":
            return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "-1"]
    return None


def machine_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs children may be given: CUDA_VISIBLE_DEVICES's list when it is set, else the
    indices `nvidia-smi -L` lists (found on env's PATH); [] when there are none, when
    JAX_PLATFORMS excludes GPUs, or when nvidia-smi is absent or fails."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu", "rocm"} & set(platforms.lower().split(",")):
        return []
    visible = visible_gpus(env)
    if visible is not None:
        return visible
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return []
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def child_env(slot: int, slots: int, gpus: list[str], per_child: int = 0) -> dict[str, str]:
    """What child `slot` of `slots` running at once adds to its environment: its GPUs,
    `per_child` of them (0: an equal share, at least one) round-robin from `gpus`, and, when
    the slots need more GPUs than there are, its share of each GPU's memory. {} without GPUs."""
    if not gpus:
        return {}
    k = per_child or max(1, len(gpus) // slots)
    mine = [gpus[(slot * k + j) % len(gpus)] for j in range(k)]
    env = {VISIBLE: ",".join(mine)}
    sharing = math.ceil(slots * k / len(gpus))  # children per GPU, at most
    if sharing > 1:
        env[MEM_FRACTION] = f"{math.floor(100 * USABLE_MEMORY / sharing) / 100:.2f}"
    return env


def with_child_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """`base` with a child's GPU settings; a memory fraction the user set is kept."""
    env = dict(base)
    for name, value in extra.items():
        if name == MEM_FRACTION and name in env:
            continue
        env[name] = value
    return env
