"""The train loop's compiled call: preprocessing, the train step and the metric log in one program.

Per call the host hands the device a uint8 global batch (or `--steps_per_call` K of them,
stacked) and nothing comes back that it waits for: each step writes its metrics (loss sum,
correct count, example count; a population's `alive` marks) into row `step % rows` of a small
log on the device, carried from call to call, and the loop reads it every `--metrics_every`
steps (loop_metrics.py). The log is not donated: the loop reads the previous call's log after
dispatching the next call, so a read waits for the previous call only, never the running one.
The log keeps every step's own numbers, not a running float32 sum, so the host adds them in
float64 in step order exactly as when it read every step: the epoch rows do not depend on
--metrics_every or --steps_per_call, and the first non-finite step is known exactly however
late it is read.

K steps per call run as `jax.lax.scan` over the stacked batches, preprocessed together before
the scan; its body is the single-step program, so K steps give the bit-identical state and
metrics of K calls (tests/test_loop.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nodepert_dist import device_data
from nodepert_dist import mesh as mesh_lib

KEYS = ("loss_sum", "correct", "count")  # a population's log adds "alive"


def log_rows(metrics_every: int, steps_per_call: int) -> int:
    """Rows the log needs: after dispatching a call the loop reads the previous call's log once
    `metrics_every` steps are unread, so up to metrics_every - 1 + 2 calls' steps are."""
    return metrics_every + 2 * steps_per_call - 1


def _write(log: dict, at, metrics: dict) -> dict:
    """Row `at` of the log set to the step's metrics; a population's `at` and metrics are per
    member, so the write is elementwise and a member-sharded log needs no collective."""
    rows = next(iter(log.values())).shape[0]
    hit = jnp.arange(rows).reshape(rows, *(1,) * jnp.ndim(at)) == at
    return {k: jnp.where(hit, metrics[k].astype(jnp.float32), log[k]) for k in log}


@dataclasses.dataclass
class LoopStep:
    """`call(state, log, x, labels) -> (state, log, metrics)`: one step on a (B, ...) batch, or
    `steps_per_call` steps on a (K, B, ...) stack (metrics then stacked too); the state is
    donated. `new_log()`: an empty log on the mesh. `call_on_device(state, log, data, order,
    i, k) -> (state, log, metrics, x, labels)`: the same program on batches i..i+k-1 of a
    device_data.DeviceData's epoch order, gathered inside the call (--data_on_device)."""

    call: Callable
    call_on_device: Callable
    new_log: Callable
    rows: int
    steps_per_call: int

    def call_size(self, room: int, n_steps: int) -> int:
        """The next call's steps, `room` steps before the next epoch end, --max_steps or step
        checkpoint: K; when fewer are left, the epoch's tail n_steps % K in one call if it fits
        (one more program, compiled once: an epoch of K-step calls ends with one call, not
        n_steps % K single ones), else 1."""
        k, tail = self.steps_per_call, n_steps % self.steps_per_call
        return k if room >= k else tail if 1 < tail <= room else 1

    def call_sizes(self, done: int, n_steps: int) -> list[int]:
        """The calls of an epoch's batches done..n_steps-1 with no other boundary inside."""
        sizes = []
        while done < n_steps:
            sizes.append(self.call_size(n_steps - done, n_steps))
            done += sizes[-1]
        return sizes


def make(
    sharded_step: Callable, prep: tuple, mesh, *, rows: int, members: int = 0, steps_per_call=1
) -> LoopStep:
    """The loop's call around `sharded_step` (step.sharded_train_step), with the preprocessing
    `prep` = preprocess.device_parts(...) traced into the same program. `members`: a
    population's size (0: a solo run), the log's second axis."""
    prep_fn, consts = prep
    keys = KEYS + (("alive",) if members else ())
    shape = (rows, members) if members else (rows,)
    # a population's log is split over `member` as its metrics are
    sharding = NamedSharding(mesh, P(None, mesh_lib.MEMBER) if members else P())

    empty = jax.jit(
        lambda: {k: jnp.zeros(shape, jnp.float32) for k in keys}, out_shardings=sharding
    )

    def one(carry, batch):
        state, log = carry
        x, labels = batch
        at = state.step % rows  # the update's row (a population's: per member, all equal)
        state, metrics = sharded_step(state, x, labels)
        return (state, _write(log, at, metrics)), metrics

    def single(state, log, c, x, labels):
        (state, log), metrics = one((state, log), (prep_fn(x, c), labels))
        return state, log, metrics

    def chunk(state, log, c, xs, labels):
        # The K batches preprocessed together before the scan, as one elementwise op (zca: one
        # product per batch, preprocess.device_parts): inside the scan's body, or batch by
        # batch, XLA rewrote the division by the constants differently (x * 1/255) and the
        # state differed in the last bits (measured).
        (state, log), metrics = jax.lax.scan(one, (state, log), (prep_fn(xs, c), labels))
        return state, log, metrics

    programs = {
        False: mesh_lib.serialize_if_multiprocess_cpu(jax.jit(single, donate_argnums=0)),
        True: mesh_lib.serialize_if_multiprocess_cpu(jax.jit(chunk, donate_argnums=0)),
    }

    def call(state, log, x, labels):
        stacked = labels.ndim == 2  # labels: (B,) for one step, (K, B) for K
        return programs[stacked](state, log, consts, x, labels)

    def on_device(state, log, c, images, labels, order, i, k):
        x, y = device_data.gather(mesh, images, labels, order, i, k)
        return *(chunk if k > 1 else single)(state, log, c, x, y), x, y

    gathered = mesh_lib.serialize_if_multiprocess_cpu(
        jax.jit(on_device, donate_argnums=0, static_argnames="k")
    )

    def call_on_device(state, log, data, order, i, k):
        return gathered(state, log, consts, data.images, data.labels, order, i, k=k)

    return LoopStep(
        call=call,
        call_on_device=call_on_device,
        new_log=empty,
        rows=rows,
        steps_per_call=steps_per_call,
    )
