"""Checkpoints on disk: the layout and names, the manifest, the array specs, the error types.

The bottom layer of the checkpoint code: `checkpoint.py` (save: Checkpointer) and
`checkpoint_restore.py` (restore, load) both build on it and on nothing of each other.

Layout under `<workdir>/checkpoints/` (plain zarr3 + JSON, readable without this package):

    step_00000120/                    a committed checkpoint; only complete ones bear this name
      manifest.json                   step, loop position, config, seed, versions, array list
      arrays/<leaf name>/zarr.json    one zarr3 array per train-state leaf (zstd + crc32c),
      arrays/<leaf name>/c/...        one chunk per shard, written by the process holding it
      done/process_<i>.json           process i's "my shards are written" marker + data position
    .tmp-step_00000150-<token>/       a save in flight, or left by a crash: never read
    .deleting-.../                    an old checkpoint being removed
    .unreadable-step_00000180-<token>/  set aside: failed to read at restore (maybe transiently)
    .superseded-step_00000190-<token>/  set aside: newer than a step saved after it
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil

import numpy as np

from nodepert_dist import checkpoint_faults, files

FORMAT = "nodepert_dist.checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CODECS = [
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "zstd", "configuration": {"level": 3}},
    {"name": "crc32c"},
]
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "tensorstore", "grain")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (one-line message)."""


class NonFiniteState(CheckpointError):
    """A train state holding NaN or Inf, refused by `save` (training diverged)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that is unreadable or inconsistent: restore falls back to an older one."""


# ----------------------------------------------------------------------------- names and paths


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}")


def tmp_dir(directory: str, step: int, token: str) -> str:
    """Where a save of `step` by the attempt `token` is written before its commit."""
    return os.path.join(directory, f".tmp-step_{step:08d}-{token}")


def marker_path(tmp: str, process: int) -> str:
    return os.path.join(tmp, "done", f"process_{process}.json")


def committed_steps(directory: str) -> list[int]:
    """Steps of the committed checkpoints in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(directory)) if m)
    return checkpoint_faults.listing(steps)


def array_spec(path: str, shape=None, dtype=None, chunk=None) -> dict:
    """The Tensorstore spec of one saved array: to create it (with shape, dtype, chunk) or to
    open it (path only)."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        spec["store_data_equal_to_fill_value"] = True  # every chunk exists: a lost one is detected
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "codecs": _CODECS,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        }
    return spec


def remove(directory: str, name: str, token: str) -> None:
    """Renames away first, so that a crash mid-removal never leaves a half checkpoint."""
    doomed = os.path.join(directory, f".deleting-{name}-{token}")
    os.rename(os.path.join(directory, name), doomed)
    shutil.rmtree(doomed)


def set_aside(directory: str, name: str, why: str, token: str) -> str:
    """Renames a checkpoint out of the `step_*` names, keeping it: never deleted here."""
    aside = os.path.join(directory, f".{why}-{name}-{token}")
    os.rename(os.path.join(directory, name), aside)
    return aside


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    return text if isinstance(e, CheckpointError) else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------- manifest


def versions() -> dict:
    """The installed versions of the packages that wrote the arrays (recorded in the manifest)."""
    out = {}
    for package in _VERSIONED:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def write_json(path: str, obj) -> None:
    """A manifest or done marker: atomic and durable (files.py); numpy values allowed. The same
    bytes as the first version wrote (no final newline), so the format is unchanged."""
    files.write_text(path, files.json_text(obj, indent=1, default=_json_default))


def read_manifest(path: str) -> dict:
    """The manifest of the checkpoint folder `path`; CorruptCheckpoint if unreadable."""
    try:
        manifest = files.read_json(os.path.join(path, MANIFEST))
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CorruptCheckpoint(f"{path}: format {found!r} is not {FORMAT!r}")
    return manifest
