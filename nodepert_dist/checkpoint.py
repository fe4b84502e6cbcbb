"""Saving sharded Tensorstore checkpoints: asynchronous and atomically committed.

The layout on disk, names and manifest are `checkpoint_layout.py`'s; restoring (onto any mesh)
is `checkpoint_restore.py`'s.

Save (`Checkpointer.save`): the train loop waits for the previous save, then copies the shards
it holds with replica_id == 0 to host memory (the only stall), and a background thread writes
them into the temporary directory, then writes this process's done marker. No gathering onto
one host. The background thread runs no collectives, so it cannot misorder or deadlock them.
A state holding NaN or Inf (a diverged run) is refused with NonFiniteState (a CheckpointError),
on every process.

Commit (complete or invisible): each process's background thread reports "written" or its error
under a key of the jax.distributed coordination service (key-value store; a dict with one
process). Process 0's thread waits for every report, checks that every done marker is in the
temporary directory (checkpoints need a file system shared by all processes), writes
manifest.json last, fsyncs, renames the directory to `step_<step>` (one atomic rename) and
publishes "committed" or the error. Only then are older checkpoints pruned: the newest `keep`
stay, plus every step that is a multiple of `keep_every_steps`, plus the newest at or before
`rollback_step` (what the crash guard rolls back to); nothing newer than the step just saved is
deleted (it is set aside). The next `save` or `wait` on every process reads that
outcome, so a failed write or commit anywhere raises the same CheckpointError on every process
at the same point (no process is left waiting in a collective), within `commit_timeout_s`.
The temporary name carries a token chosen by process 0 at start up, so the markers of a crashed
attempt at the same step can never complete a new one. `Checkpointer.wait` (end of training)
also runs one barrier, so no process exits before the commit. A full disk or a read-only
workdir is such an error (one line); the previous checkpoint is untouched.

Fault injection for tests (a stalled or failing writer): `checkpoint_faults.py`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils

from nodepert_dist import agree, checkpoint_faults, files
from nodepert_dist.checkpoint_layout import (
    FORMAT,
    MANIFEST,
    CheckpointError,
    NonFiniteState,
    array_spec,
    committed_steps,
    marker_path,
    one_line,
    remove,
    set_aside,
    step_dir,
    tmp_dir,
    versions,
    write_json,
)
from nodepert_dist.params_io import leaf_name

# ----------------------------------------------------------------------------- save


class Checkpointer:
    """Saves train states into `directory` asynchronously; one save in flight at a time.

    Every process constructs it and calls `save` and `wait` at the same points (the first
    runs a collective to agree on the attempt token, `wait` a barrier).
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        keep_every_steps: int = 0,
        rollback_step: int | None = None,
        commit_timeout_s: float = 600.0,
    ):
        self.directory = directory
        self.keep, self.keep_every_steps = keep, keep_every_steps
        # Pruning also keeps the newest checkpoint at or before this step: the crash guard's
        # rollback target (train.py sets it to the last epoch row's step).
        self.rollback_step = rollback_step
        self.commit_timeout_s = commit_timeout_s
        self.process, self.process_count = jax.process_index(), jax.process_count()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: int | None = None  # the step whose commit outcome is not read yet
        self.last_step: int | None = None
        if self.process == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):  # saves abandoned by a crash, unfinished removals
                if name.startswith((".tmp-", ".deleting-")):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        # A collective: no process saves before the clean-up above is done.
        token = multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31)))
        self.token = f"{int(token):08x}"

    def _key(self, step: int, what: str) -> str:
        return f"nodepert_dist/checkpoint/{self.token}/{step}/{what}"

    def save(self, step: int, state: Any, meta: dict, position: dict | None = None) -> None:
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
        mine = [
            [(s.index, s.data) for s in leaf.addressable_shards if s.replica_id == 0]
            for _, leaf in leaves
        ]
        for shards in mine:
            for _, data in shards:
                data.copy_to_host_async()  # all copies in flight at once
        arrays = []
        for (path, leaf), shards in zip(leaves, mine):
            shards = [(index, np.array(data)) for index, data in shards]  # a host copy
            arrays.append(
                {
                    "name": leaf_name(path),
                    "key": jax.tree_util.keystr(path),
                    "shape": list(leaf.shape),
                    "dtype": np.dtype(leaf.dtype).name,
                    "chunk": list(leaf.sharding.shard_shape(leaf.shape)),
                    "shards": shards,
                }
            )
        # Host copies, so no extra device sync; agreed so that every process raises alike.
        finite = all(
            np.isfinite(d).all()
            for a in arrays
            for _, d in a["shards"]
            if np.issubdtype(d.dtype, np.inexact)
        )
        if not agree.everywhere(finite):
            raise NonFiniteState(
                f"the train state of step {step} holds NaN or Inf (training "
                f"diverged; use a lower --lr); it was not saved"
            )
        meta = jax.device_get(meta)
        names = [a["name"] for a in arrays]
        if len(set(names)) != len(names):
            raise CheckpointError(f"two train-state leaves share a checkpoint name: {names}")
        t2 = time.perf_counter()
        self.last_step = self._pending = step
        self._thread = threading.Thread(
            target=self._write,
            name=f"checkpoint-{step}",
            daemon=True,
            args=(step, arrays, meta, position or {}, t2 - t0),
        )
        self._thread.start()
        logging.debug(
            "checkpoint step %d: train loop blocked %.3f s (%.3f s waiting for the "
            "previous save, %.3f s for the device to finish the step, %.3f s "
            "device-to-host)",
            step,
            t2 - t0,
            t1 - t0,
            t_ready - t1,
            t2 - t_ready,
        )

    def wait(self) -> None:
        """Blocks until the pending save is committed everywhere; raises its error, if any."""
        self._join()
        multihost_utils.sync_global_devices("nodepert_dist.checkpoint.wait")

    def _join(self) -> None:
        """Waits for the save in flight and its commit; the same outcome on every process."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        step, self._pending = self._pending, None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(
                f"saving checkpoint step {step} failed on process {self.process}: {one_line(error)}"
            ) from error
        if step is None:
            return
        outcome = agree.kv_get(self._key(step, "commit"), self.commit_timeout_s)
        if outcome is None:
            raise CheckpointError(
                f"saving checkpoint step {step}: process 0 did not commit it "
                f"within {self.commit_timeout_s:.0f} s"
            )
        if outcome != "committed":
            raise CheckpointError(f"saving checkpoint step {step} failed: {outcome}")

    # Background thread: file I/O only, no collectives.
    def _write(self, step, arrays, meta, position, stall_s) -> None:
        try:
            t0 = time.perf_counter()
            tmp = tmp_dir(self.directory, step, self.token)
            os.makedirs(os.path.join(tmp, "done"), exist_ok=True)
            writes = []
            for i, a in enumerate(arrays):
                if a["shards"]:
                    spec = array_spec(
                        os.path.join(tmp, "arrays", a["name"]), a["shape"], a["dtype"], a["chunk"]
                    )
                    store = ts.open(spec, create=True, open=True).result()
                    writes += [store[index].write(data) for index, data in a["shards"]]
                if i == 0:
                    checkpoint_faults.after_first_array(step)
            for w in writes:
                w.result()
            checkpoint_faults.before_marker(step, self.process)
            nbytes = sum(d.nbytes for a in arrays for _, d in a["shards"])
            write_json(
                marker_path(tmp, self.process),
                {"process": self.process, "position": position, "bytes": nbytes},
            )
        except BaseException as e:  # re-raised on the main thread by the next save or wait
            self._error = e
        agree.kv_set(
            self._key(step, f"written/{self.process}"),
            "ok" if self._error is None else one_line(self._error),
        )
        if self.process != 0:
            return
        try:
            if self._error is None:
                self._commit(step, tmp, arrays, meta)
                logging.info(
                    "checkpoint step %d: written and committed in %.3f s (%.1f MB "
                    "from this process; the loop was blocked %.3f s)",
                    step,
                    time.perf_counter() - t0,
                    nbytes / 1e6,
                    stall_s,
                )
        except BaseException as e:
            self._error = e
        agree.kv_set(
            self._key(step, "commit"),
            "committed" if self._error is None else f"process 0: {one_line(self._error)}",
        )

    def _commit(self, step, tmp, arrays, meta) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        for p in range(1, self.process_count):  # every process's report, through the KV store
            report = agree.kv_get(self._key(step, f"written/{p}"), deadline - time.monotonic())
            if report is None:
                raise CheckpointError(
                    f"step {step}: process {p} did not report its write "
                    f"within {self.commit_timeout_s:.0f} s"
                )
            if report != "ok":
                raise CheckpointError(f"process {p} failed to write step {step}: {report}")
        markers = [marker_path(tmp, p) for p in range(self.process_count)]
        while not all(map(os.path.exists, markers)):
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"step {step}: not every process finished writing within "
                    f"{self.commit_timeout_s:.0f} s (is {self.directory} on a shared file system?)"
                )
            time.sleep(0.02)
        processes = [files.read_json(path) for path in markers]
        manifest = dict(
            meta,
            format=FORMAT,
            step=step,
            time=time.time(),
            process_count=self.process_count,
            versions=versions(),
            processes=[{"process": p["process"], "position": p["position"]} for p in processes],
            arrays=[{k: a[k] for k in ("name", "key", "shape", "dtype", "chunk")} for a in arrays],
        )
        # last, durable with its folder entry (files fsyncs it): the folder is then complete
        write_json(os.path.join(tmp, MANIFEST), manifest)
        final = step_dir(self.directory, step)
        if os.path.exists(final):  # left by an earlier attempt that got further than this one
            set_aside(self.directory, os.path.basename(final), "superseded", self.token)
        os.rename(tmp, final)
        files.fsync_dir(self.directory)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        steps = committed_steps(self.directory)
        older = [s for s in steps if s <= newest]
        keep = set(older[-self.keep :]) if self.keep > 0 else set(older)
        if self.keep_every_steps > 0:
            keep |= {s for s in older if s % self.keep_every_steps == 0}
        target = self.rollback_step  # read once: the train loop may move it meanwhile
        if target is not None and [s for s in older if s <= target]:
            keep.add(max(s for s in older if s <= target))
        for s in steps:
            name = os.path.basename(step_dir(self.directory, s))
            if s > newest:  # never deleted: it may be the newest good one
                aside = set_aside(self.directory, name, "superseded", self.token)
                logging.warning(
                    "checkpoint step %d is newer than step %d just saved; set aside "
                    "as %s (not deleted)",
                    s,
                    newest,
                    aside,
                )
            elif s not in keep:
                remove(self.directory, name, self.token)
