"""Sharded Tensorstore checkpoints: asynchronous, atomically committed, restorable on any mesh.

Layout under `<workdir>/checkpoints/` (plain zarr3 + JSON, readable without this package):

    step_00000120/                    a committed checkpoint; only complete ones bear this name
      manifest.json                   step, loop position, config, seed, versions, array list
      arrays/<leaf name>/zarr.json    one zarr3 array per train-state leaf (zstd + crc32c),
      arrays/<leaf name>/c/...        one chunk per shard, written by the process holding it
      done/process_<i>.json           process i's "my shards are written" marker + data position
    .tmp-step_00000150-<token>/       a save in flight, or left by a crash: never read
    .deleting-.../                    an old checkpoint being removed

Save (`Checkpointer.save`): the train loop waits for the previous save, then copies the shards
it holds with replica_id == 0 to host memory (the only stall), and a background thread writes
them into the temporary directory, then writes this process's done marker. No gathering onto
one host. The background thread runs no collectives, so it cannot misorder or deadlock them.
A state holding NaN or Inf (a diverged run) is refused with a CheckpointError, on every process.

Commit (complete or invisible): process 0's background thread waits until every process's done
marker is in the temporary directory (checkpoints need a file system shared by all processes),
writes manifest.json last, fsyncs, and renames the directory to `step_<step>`, one atomic
rename. Only then are older checkpoints pruned: the newest `keep` stay, plus every step that is
a multiple of `keep_every_steps`. The temporary name carries a token chosen by process 0 at start
up, so the markers of a crashed attempt at the same step can never complete a new one.
`Checkpointer.wait` (end of training) joins the thread and then runs one barrier on the main
thread, so no process exits before the commit.

Restore (`restore`): the newest committed checkpoint that reads back completely is loaded onto
the target's shardings (whatever mesh wrote it: resharding happens on read). A corrupt one
(unreadable manifest, missing array or chunk, checksum failure, manifest that disagrees with the
array) is skipped with a warning naming the fallback; a checkpoint of another model (names,
shapes or dtypes unlike the target's) is a one-line error naming the array.

Test hook: NODEPERT_CKPT_TEST_WRITE_DELAY_S="SECONDS[@FROM_STEP]" makes the background writer
sleep SECONDS after writing its first array (for saves at step >= FROM_STEP), so tests can kill a
process while a save is in flight. Never set it outside tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils

from nodepert_dist.params_io import leaf_name

FORMAT = "nodepert_dist.checkpoint/1"
MANIFEST = "manifest.json"
TEST_DELAY_ENV = "NODEPERT_CKPT_TEST_WRITE_DELAY_S"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
           {"name": "zstd", "configuration": {"level": 3}},
           {"name": "crc32c"}]
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "tensorstore", "grain")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (one-line message)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that is unreadable or inconsistent: restore falls back to an older one."""


# ----------------------------------------------------------------------------- names and paths

def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}")


def committed_steps(directory: str) -> list[int]:
    """Steps of the committed checkpoints in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(directory)) if m)


def _array_spec(path: str, shape=None, dtype=None, chunk=None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        spec["store_data_equal_to_fill_value"] = True  # every chunk exists: a lost one is detected
        spec["metadata"] = {
            "shape": list(shape), "data_type": np.dtype(dtype).name, "codecs": _CODECS,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}}}
    return spec


def _write_json(path: str, obj) -> None:
    """Atomic, durable JSON file: temporary file, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(directory: str, name: str, token: str) -> None:
    """Renames away first, so that a crash mid-removal never leaves a half checkpoint."""
    doomed = os.path.join(directory, f".deleting-{name}-{token}")
    os.rename(os.path.join(directory, name), doomed)
    shutil.rmtree(doomed)


def _versions() -> dict:
    out = {}
    for package in _VERSIONED:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _test_delay(step: int) -> None:
    value = os.environ.get(TEST_DELAY_ENV)
    if not value:
        return
    seconds, _, from_step = value.partition("@")
    if step >= int(from_step or 0):
        time.sleep(float(seconds))


# ----------------------------------------------------------------------------- save

class Checkpointer:
    """Saves train states into `directory` asynchronously; one save in flight at a time.

    Every process constructs it and calls `save` and `wait` at the same points (the first
    runs a collective to agree on the attempt token, `wait` a barrier).
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_every_steps: int = 0,
                 commit_timeout_s: float = 600.0):
        self.directory = directory
        self.keep, self.keep_every_steps = keep, keep_every_steps
        self.commit_timeout_s = commit_timeout_s
        self.process, self.process_count = jax.process_index(), jax.process_count()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_step: Optional[int] = None
        if self.process == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):  # saves abandoned by a crash, unfinished removals
                if name.startswith((".tmp-", ".deleting-")):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        # A collective: no process saves before the clean-up above is done.
        token = multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31)))
        self.token = f"{int(token):08x}"

    def save(self, step: int, state: Any, meta: dict, position: Optional[dict] = None) -> None:
        """Starts saving `state` (a pytree of jax.Arrays) as step `step`; returns once the
        shards are in host memory. `meta` goes into the manifest (JSON, jax scalars allowed);
        `position` is this process's data position (recorded per process)."""
        t0 = time.perf_counter()
        self._join()
        t1 = time.perf_counter()
        jax.block_until_ready(state)  # timed apart: the device finishing its queued steps
        t_ready = time.perf_counter()
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        # This process's shards with replica_id 0: every shard index is written exactly once.
        mine = [[(s.index, s.data) for s in leaf.addressable_shards if s.replica_id == 0]
                for _, leaf in leaves]
        for shards in mine:
            for _, data in shards:
                data.copy_to_host_async()  # all copies in flight at once
        arrays = []
        for (path, leaf), shards in zip(leaves, mine):
            shards = [(index, np.array(data)) for index, data in shards]  # a host copy
            arrays.append({"name": leaf_name(path), "key": jax.tree_util.keystr(path),
                           "shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name,
                           "chunk": list(leaf.sharding.shard_shape(leaf.shape)), "shards": shards})
        # Host copies, so no extra device sync; agreed so that every process raises alike.
        finite = all(np.isfinite(d).all() for a in arrays for _, d in a["shards"]
                     if np.issubdtype(d.dtype, np.inexact))
        if not _everywhere(finite):
            raise CheckpointError(f"the train state of step {step} holds NaN or Inf (training "
                                  f"diverged; use a lower --lr); it was not saved")
        meta = jax.device_get(meta)
        names = [a["name"] for a in arrays]
        if len(set(names)) != len(names):
            raise CheckpointError(f"two train-state leaves share a checkpoint name: {names}")
        t2 = time.perf_counter()
        self.last_step = step
        self._thread = threading.Thread(
            target=self._write, name=f"checkpoint-{step}", daemon=True,
            args=(step, arrays, meta, position or {}, t2 - t0))
        self._thread.start()
        logging.info("checkpoint step %d: train loop blocked %.3f s (%.3f s waiting for the "
                     "previous save, %.3f s for the device to finish the step, %.3f s "
                     "device-to-host)", step, t2 - t0, t1 - t0, t_ready - t1, t2 - t_ready)

    def wait(self) -> None:
        """Blocks until the pending save is committed everywhere; raises its error, if any."""
        self._join()
        multihost_utils.sync_global_devices("nodepert_dist.checkpoint.wait")

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"saving a checkpoint failed: {error}") from error

    # Background thread: file I/O only, no collectives.
    def _write(self, step, arrays, meta, position, stall_s) -> None:
        try:
            t0 = time.perf_counter()
            tmp = os.path.join(self.directory, f".tmp-step_{step:08d}-{self.token}")
            os.makedirs(os.path.join(tmp, "done"), exist_ok=True)
            writes = []
            for i, a in enumerate(arrays):
                if a["shards"]:
                    spec = _array_spec(os.path.join(tmp, "arrays", a["name"]),
                                       a["shape"], a["dtype"], a["chunk"])
                    store = ts.open(spec, create=True, open=True).result()
                    writes += [store[index].write(data) for index, data in a["shards"]]
                if i == 0:
                    _test_delay(step)
            for w in writes:
                w.result()
            nbytes = sum(d.nbytes for a in arrays for _, d in a["shards"])
            _write_json(os.path.join(tmp, "done", f"process_{self.process}.json"),
                        {"process": self.process, "position": position, "bytes": nbytes})
            if self.process == 0:
                self._commit(step, tmp, arrays, meta)
            logging.info("checkpoint step %d: background write %.3f s (%.1f MB from this "
                         "process; the loop was blocked %.3f s)", step,
                         time.perf_counter() - t0, nbytes / 1e6, stall_s)
        except BaseException as e:  # re-raised on the main thread by the next save or wait
            self._error = e

    def _commit(self, step, tmp, arrays, meta) -> None:
        markers = [os.path.join(tmp, "done", f"process_{p}.json") for p in range(self.process_count)]
        deadline = time.monotonic() + self.commit_timeout_s
        while not all(map(os.path.exists, markers)):
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"step {step}: not every process finished writing within "
                    f"{self.commit_timeout_s:.0f} s (is {self.directory} on a shared file system?)")
            time.sleep(0.02)
        processes = []
        for path in markers:
            with open(path) as f:
                processes.append(json.load(f))
        manifest = dict(meta, format=FORMAT, step=step, time=time.time(),
                        process_count=self.process_count, versions=_versions(),
                        processes=[{"process": p["process"], "position": p["position"]}
                                   for p in processes],
                        arrays=[{k: a[k] for k in ("name", "key", "shape", "dtype", "chunk")}
                                for a in arrays])
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        _fsync_dir(tmp)
        final = step_dir(self.directory, step)
        if os.path.exists(final):  # left by an abandoned run that got further than this one
            _remove(self.directory, os.path.basename(final), self.token)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        steps = committed_steps(self.directory)
        older = [s for s in steps if s <= newest]
        keep = set(older[-self.keep:]) if self.keep > 0 else set(older)
        if self.keep_every_steps > 0:
            keep |= {s for s in older if s % self.keep_every_steps == 0}
        for s in steps:
            if s > newest:
                logging.warning("removing checkpoint step %d: newer than step %d just saved, it "
                                "belongs to an abandoned run", s, newest)
            if s not in keep:
                _remove(self.directory, os.path.basename(step_dir(self.directory, s)), self.token)


# ----------------------------------------------------------------------------- restore

def read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def _open_checked(path: str, entry: dict):
    """Opens one saved array and checks it against its manifest entry and its chunk files."""
    name = entry["name"]
    array_dir = os.path.join(path, "arrays", name)
    try:
        store = ts.open(_array_spec(array_dir), open=True).result()
    except Exception as e:
        raise CorruptCheckpoint(f"{path}: array {name!r} cannot be opened "
                                f"({str(e).splitlines()[0]})") from None
    saved = [list(store.shape), store.dtype.numpy_dtype.name]
    if saved != [entry["shape"], entry["dtype"]]:
        raise CorruptCheckpoint(f"{path}: array {name!r} is {saved[0]} {saved[1]} on disk but "
                                f"{entry['shape']} {entry['dtype']} in the manifest")
    chunk = entry["chunk"]
    expected = int(np.prod([-(-n // c) for n, c in zip(entry["shape"], chunk)]))
    keys = ts.KvStore.open({"driver": "file", "path": array_dir + "/"}).result().list().result()
    found = sum(1 for k in keys if k == b"c" or k.startswith(b"c/"))
    if found != expected:
        raise CorruptCheckpoint(f"{path}: array {name!r} has {found} of its {expected} chunk files")
    return store


def load(path: str, target: Any) -> tuple[Any, dict]:
    """Reads the checkpoint at `path` onto the shardings of `target` (a pytree of jax.Arrays)."""
    manifest = read_manifest(path)
    entries = {a["name"]: a for a in manifest["arrays"]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [leaf_name(p) for p, _ in leaves]
    for name in names:
        if name not in entries:
            raise CheckpointError(f"checkpoint {path} has no array {name!r}: it was saved by "
                                  f"another model or optimizer")
    for name in entries:
        if name not in names:
            raise CheckpointError(f"checkpoint {path} has array {name!r} that this model lacks: "
                                  f"it was saved by another model or optimizer")
    out = []
    for name, (_, leaf) in zip(names, leaves):
        entry = entries[name]
        store = _open_checked(path, entry)
        if (tuple(entry["shape"]), entry["dtype"]) != (leaf.shape, np.dtype(leaf.dtype).name):
            raise CheckpointError(
                f"checkpoint {path}: array {name!r} is {tuple(entry['shape'])} {entry['dtype']} "
                f"but this model has {leaf.shape} {np.dtype(leaf.dtype).name}")
        cache = {}

        def read(index, store=store, cache=cache):
            key = repr(index)
            if key not in cache:
                cache[key] = store[index].read().result()
            return cache[key]

        try:
            out.append(jax.make_array_from_callback(leaf.shape, leaf.sharding, read))
        except Exception as e:
            raise CorruptCheckpoint(f"{path}: array {name!r} cannot be read "
                                    f"({str(e).splitlines()[0]})") from None
    return jax.tree_util.tree_unflatten(treedef, out), manifest


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore(directory: str, target: Any) -> Optional[tuple[Any, dict]]:
    """(state, manifest) from the newest valid checkpoint in `directory`; None if there is none.

    Corrupt checkpoints are skipped with a warning; if none is valid, CorruptCheckpoint.
    """
    steps = committed_steps(directory)
    problems = []
    for i, step in enumerate(reversed(steps)):
        try:
            state, manifest = load(step_dir(directory, step), target)
            error = None
        except CorruptCheckpoint as e:
            error = e
        if _everywhere(error is None):
            if problems:
                logging.warning("restored checkpoint step %d, the newest valid one", step)
            return state, manifest
        error = error or CorruptCheckpoint(f"step {step} is unreadable on another process")
        problems.append(str(error))
        older = list(reversed(steps))[i + 1:]
        logging.warning("checkpoint is corrupt: %s; %s", error,
                        f"falling back to step {older[0]}" if older else "no older checkpoint")
    if problems:
        raise CorruptCheckpoint(f"no valid checkpoint in {directory}: " + "; ".join(problems))
    return None
