"""Restoring checkpoints: the newest that reads back, onto any mesh (layout: checkpoint_layout).

Process 0 lists the directory and broadcasts each candidate step, newest first, so every process
restores the same step even when a stale shared-file-system cache shows them different
listings. The step is loaded onto the target's shardings (whatever mesh wrote it: resharding
happens on read). One that fails to read on any process (unreadable manifest, missing array or
chunk, checksum failure, manifest that disagrees with the array; possibly a transient I/O error)
is renamed aside to `.unreadable-...` by process 0, never deleted, and the next older one is
tried; a checkpoint of another model (names, shapes or dtypes unlike the target's) is a one-line
error naming the array.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from absl import logging

from nodepert_dist import agree
from nodepert_dist.checkpoint_layout import (
    CheckpointError,
    CorruptCheckpoint,
    array_spec,
    committed_steps,
    read_manifest,
    set_aside,
    step_dir,
)
from nodepert_dist.params_io import leaf_name


def _open_checked(path: str, entry: dict):
    """Opens one saved array and checks it against its manifest entry and its chunk files."""
    name = entry["name"]
    array_dir = os.path.join(path, "arrays", name)
    try:
        store = ts.open(array_spec(array_dir), open=True).result()
    except Exception as e:
        raise CorruptCheckpoint(
            f"{path}: array {name!r} cannot be opened ({str(e).splitlines()[0]})"
        ) from None
    saved = [list(store.shape), store.dtype.numpy_dtype.name]
    if saved != [entry["shape"], entry["dtype"]]:
        raise CorruptCheckpoint(
            f"{path}: array {name!r} is {saved[0]} {saved[1]} on disk but "
            f"{entry['shape']} {entry['dtype']} in the manifest"
        )
    chunk = entry["chunk"]
    expected = int(np.prod([-(-n // c) for n, c in zip(entry["shape"], chunk)]))
    keys = ts.KvStore.open({"driver": "file", "path": array_dir + "/"}).result().list().result()
    found = sum(1 for k in keys if k == b"c" or k.startswith(b"c/"))
    if found != expected:
        raise CorruptCheckpoint(f"{path}: array {name!r} has {found} of its {expected} chunk files")
    return store


def load(path: str, target: Any) -> tuple[Any, dict]:
    """Reads the checkpoint at `path` onto the shardings of `target`: a pytree of jax.Arrays or
    jax.ShapeDtypeStructs with shardings, or a function of the manifest returning one (it may
    refuse the checkpoint by raising before any array is read)."""
    manifest = read_manifest(path)
    if callable(target):
        target = target(manifest)
    entries = {a["name"]: a for a in manifest["arrays"]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [leaf_name(p) for p, _ in leaves]
    for name in names:
        if name not in entries:
            raise CheckpointError(
                f"checkpoint {path} has no array {name!r}: it was saved by "
                f"another model or optimizer"
            )
    for name in entries:
        if name not in names:
            raise CheckpointError(
                f"checkpoint {path} has array {name!r} that this model lacks: "
                f"it was saved by another model or optimizer"
            )
    out = []
    for name, (_, leaf) in zip(names, leaves):
        entry = entries[name]
        store = _open_checked(path, entry)
        if (tuple(entry["shape"]), entry["dtype"]) != (leaf.shape, np.dtype(leaf.dtype).name):
            raise CheckpointError(
                f"checkpoint {path}: array {name!r} is {tuple(entry['shape'])} {entry['dtype']} "
                f"but this model has {leaf.shape} {np.dtype(leaf.dtype).name}"
            )
        cache = {}

        def read(index, store=store, cache=cache):
            key = repr(index)
            if key not in cache:
                cache[key] = store[index].read().result()
            return cache[key]

        try:
            out.append(jax.make_array_from_callback(leaf.shape, leaf.sharding, read))
        except Exception as e:
            raise CorruptCheckpoint(
                f"{path}: array {name!r} cannot be read ({str(e).splitlines()[0]})"
            ) from None
    return jax.tree_util.tree_unflatten(treedef, out), manifest


def restore(directory: str, target: Any) -> tuple[Any, dict] | None:
    """(state, manifest) from the newest valid checkpoint in `directory`; None if there is none.

    Process 0 chooses each candidate step and broadcasts it: every process restores the same
    one, whatever its own listing shows. Unreadable ones are set aside (renamed, never deleted)
    with a warning; if none is valid, CorruptCheckpoint.
    """
    candidates = list(reversed(committed_steps(directory))) if jax.process_index() == 0 else []
    problems = []
    while True:
        step = agree.from_process_0(candidates.pop(0) if candidates else -1)
        if step < 0:
            break
        try:
            state, manifest = load(step_dir(directory, step), target)
            error = None
        except CorruptCheckpoint as e:
            error = e
        if agree.everywhere(error is None):
            if problems:
                logging.warning("restored checkpoint step %d, the newest valid one", step)
            return state, manifest
        error = error or CorruptCheckpoint(f"step {step} is unreadable on another process")
        problems.append(str(error))
        aside = ""
        if jax.process_index() == 0:
            aside = set_aside(
                directory,
                os.path.basename(step_dir(directory, step)),
                "unreadable",
                secrets.token_hex(4),
            )
            logging.warning(
                "checkpoint step %d cannot be read (%s); set aside as %s, not "
                "deleted (remove it once you know it is bad); %s",
                step,
                error,
                aside,
                f"falling back to step {candidates[0]}" if candidates else "no older checkpoint",
            )
    if problems:
        raise CorruptCheckpoint(f"no valid checkpoint in {directory}: " + "; ".join(problems))
    return None
