"""The step's cross-device sums: a pytree psum'ed as one flat buffer per dtype.

XLA already merges a step's psums into one all-reduce op (its all-reduce combiner: on CPU the
gradient and metric sums become one all-reduce of a tuple of arrays). Across processes on CPU
that op runs through gloo one tuple element at a time, each a full collective with its own
latency (~6 ms per array on the 2-core development machine: 9 arrays cost 92-114 ms of a
148 ms fc step). Concatenating the leaves of each dtype into one buffer before the psum and
cutting it back after makes it one gloo collective per dtype (XLA keeps different dtypes'
all-reduces apart). Each element is still the sum of the same device values; XLA may fuse the
local work feeding a concatenation differently, so the update agrees to float64 rounding, not
always to the bit (tests/test_allreduce.py).

Where: CPU with several processes (`flat_sums`). With one process XLA's in-process all-reduce
costs the same either way (measured: docs/results/device_scaling.md); on GPUs NCCL runs a
combined all-reduce's arrays as one grouped call, so the copies in and out would only add
memory traffic (docs/design/distributed.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def flat_sums(mesh) -> bool:
    """Whether the step's sums go as flat buffers on this mesh: CPU devices in several
    processes (gloo), where each array of an all-reduce is a collective of its own."""
    platform = mesh.devices.flat[0].platform
    processes = {d.process_index for d in mesh.devices.flat}
    return platform == "cpu" and len(processes) > 1


def psum(tree, axis_name, flat: bool = True):
    """`jax.lax.psum(tree, axis_name)`; with `flat`, the leaves of each dtype are summed as one
    concatenated buffer (one collective per dtype, not per leaf). Same values either way."""
    if not flat:
        return jax.lax.psum(tree, axis_name)
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(jnp.result_type(leaf), []).append(i)
    summed = list(leaves)
    for indices in groups.values():
        parts = [jnp.ravel(leaves[i]) for i in indices]
        total = jax.lax.psum(jnp.concatenate(parts) if len(parts) > 1 else parts[0], axis_name)
        sizes = [math.prod(np.shape(leaves[i])) for i in indices]
        for i, piece in zip(indices, jnp.split(total, np.cumsum(sizes)[:-1])):
            summed[i] = piece.reshape(np.shape(leaves[i]))
    return jax.tree.unflatten(treedef, summed)
