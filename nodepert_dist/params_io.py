"""Train-state trees as files: the one leaf-naming rule, and the final parameters as .npz.

Checkpoint arrays (checkpoint.py) and .npz keys use the same names, e.g. `layer0.kernel`.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from nodepert_dist import files


def leaf_name(path) -> str:
    """A tree path as a file-system-safe name: `params.layer0.kernel`, `opt_state.0.mu....`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(parts))


def save_npz(path: str, params) -> None:
    """Writes a parameter tree to one .npz (keys: `leaf_name`s) from process 0.

    Every process must call it (the gather is a collective); sharded leaves are assembled whole.
    """
    arrays = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jax.process_count() > 1 and not leaf.is_fully_replicated:
            value = multihost_utils.process_allgather(leaf, tiled=True)
        else:
            value = jax.device_get(leaf)
        arrays[leaf_name(key_path)] = np.asarray(value)
    if jax.process_index() == 0:
        with files.atomic_open(path, "wb") as f:
            np.savez(f, **arrays)
