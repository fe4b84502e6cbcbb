"""A trainer step split into device time and host overhead: the train loop's epoch time against
the same epoch's compiled calls with no host in between.

    PYTHONPATH=. python benchmarks/loop_overhead.py --data_dir=data        # MNIST, fc NP
    PYTHONPATH=. python benchmarks/loop_overhead.py --quick                # CPU smoke run

For each batch size and each loop setting (`before`: --metrics_every=1 --steps_per_call=1, a
metrics read per step as the loop did before issue 22; `after`: the defaults; `k4`, `k16`:
--steps_per_call=4/16; `device`, `device_k16`: --data_on_device, 1 or 16 steps a call), the
real train loop (`train.run`: data pipeline, host batches, metric reads, progress, preemption
checks) runs --epochs epochs of fc NP; each epoch's time (`epoch_time` of the rows; epoch 1 is
left out: it compiles) is set against its pure epoch, timed by a hook right before and right
after it (the mean of the two: the same load on a shared machine, drift cancelled): the calls the trainer made that epoch (recorded as it made them: the
same compiled programs, the same call sizes in the same order, the epoch's own batches in its
order), dispatched back to back on a copy of the state with nothing read or waited for until
the last. With --data_on_device these are `loop.call_on_device` on the epoch's order (the
gather is inside, so it is device work); with the host pipeline, `loop.call` on the epoch's
batches put on the device before the clock starts (assembling and sending batches is the
host's work there). The row is the epoch with the median ratio trainer / pure (`ratios`: all
of them); overhead = that ratio - 1: what the host adds. Target on CPU: within 5% (issue 22).
Without --data_dir (or without MNIST there) the data are synthetic MNIST-shaped uint8 images
(--examples of them). Output: JSON lines (--out) and a markdown table on stdout;
benchmarks/gpu_suite.py's `loop` section runs this script.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bf16_sigma import comma_list
from gpu_suite_table import loop_table

from nodepert_dist import cli, device_data, files, train
from nodepert_dist import mesh as mesh_lib
from nodepert_dist.data import pipeline, store
from nodepert_dist.data.raw import Raw

LOOPS = {
    "before": dict(metrics_every=1, steps_per_call=1),
    "after": {},  # the defaults
    "k4": dict(steps_per_call=4),
    "k16": dict(steps_per_call=16),
    "device": dict(data_on_device=True),  # no host batches: gathered inside the call
    "device_k16": dict(data_on_device=True, steps_per_call=16),
}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def _loop_name(name: str) -> str:
    if name not in LOOPS:
        raise ValueError(f"{name!r} is not one of {', '.join(LOOPS)}")
    return name


def synthetic_mnist(root: str, n_train: int) -> str:
    """MNIST-shaped random uint8 data under `root` (the data_dir); returns root."""
    rng = np.random.default_rng(0)
    img = lambda n: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)  # noqa: E731
    lab = lambda n: rng.integers(0, 10, n).astype(np.int32)  # noqa: E731
    store.write(
        Raw(img(n_train), lab(n_train), img(1000), lab(1000), 10),
        store.store_dir(root, "mnist"),
        {"dataset": "mnist", "verified": False, "checksum_problem": "synthetic benchmark data"},
    )
    return root


class _PureEpochs:
    """Hook: after each epoch's row, the same epoch's device work again without the host: the
    calls the trainer made (its compiled programs, the same call sizes in the same order, on the
    epoch's own batches in its order) dispatched back to back on a copy of the state, nothing
    read or waited for until the last one. For
    --data_on_device that is `loop.call_on_device` on the epoch's order (the gather inside);
    for the host pipeline it is `loop.call` on the epoch's batches put on the device before the
    clock starts (assembling and sending them is the host's work there). `pairs`: (epoch
    seconds, the mean of the pure epochs timed right before it (the previous epoch's calls) and
    right after it) for epochs >= 2 (epoch 1 compiles): a drifting load cancels to first order."""

    def __init__(self):
        self.pairs = []

    def start(self, ctx) -> None:
        cfg, self.mesh, loop = ctx.cfg, ctx.mesh, ctx.run.loop
        self.cfg, self.rows, self.steps = cfg, ctx.splits["train"], ctx.steps_per_epoch
        self.x, self.y = ctx.data.train_x, ctx.data.train_y
        self.device = cfg.data_on_device and device_data.DeviceData(ctx.mesh, self.x, self.y)
        self.state, self.log = jax.tree.map(jnp.copy, ctx.state), loop.new_log()
        # The trainer's calls, recorded as it makes them (their sizes: the epoch's replay)
        self.sizes, self.seen = [], []
        self.call, self.call_on_device = loop.call, loop.call_on_device

        def call(state, log, x, labels):
            self.seen.append(labels.shape[0] if labels.ndim == 2 else 1)
            return self.call(state, log, x, labels)

        def call_on_device(state, log, data, order, i, k):
            self.seen.append(k)
            return self.call_on_device(state, log, data, order, i, k)

        loop.call, loop.call_on_device = call, call_on_device

    def _calls(self, epoch: int) -> list:
        """The epoch's calls, as functions of (state, log), their inputs already on the device."""
        b, (lo, hi) = self.cfg.batchsize, self.rows
        if self.device:
            order = self.device.epoch_order(
                seed=self.cfg.seed, epoch=epoch, rows=self.rows, global_batch=b, ahead=False
            )
            jax.block_until_ready(order)
            firsts = itertools.accumulate([0, *self.sizes])  # python ints, as the trainer's
            call = functools.partial(self.call_on_device, data=self.device, order=order)
            return [functools.partial(call, i=i, k=k) for i, k in zip(firsts, self.sizes)]
        rows = pipeline.epoch_order(self.cfg.seed, epoch, lo, hi)[: self.steps * b]
        calls, i = [], 0
        for k in self.sizes:
            idx = rows[i * b : (i + k) * b]  # the pipeline's batches (one process)
            x, y = np.asarray(self.x[idx]), np.asarray(self.y[idx], np.int32)
            x, y = x.reshape(k, b, *x.shape[1:]), y.reshape(k, b)
            batch = mesh_lib.global_batch(
                self.mesh,
                *((x, y) if k > 1 else (x[0], y[0])),
                **({"stacked": True} if k > 1 else {}),
            )
            calls.append(functools.partial(self._host_call, batch=jax.block_until_ready(batch)))
            i += k
        return calls

    def _host_call(self, state, log, batch):
        return self.call(state, log, *batch)

    def after_row(self, row, rows) -> None:
        self.sizes, self.seen = self.seen, []
        calls = self._calls(row["epoch"])
        start = time.perf_counter()
        state, log = self.state, self.log
        for call in calls:
            state, log, *_ = call(state, log)
        jax.block_until_ready((state, log))
        pure, self.state = time.perf_counter() - start, state
        if row["epoch"] >= 2:  # epoch 1 compiles: its pure epoch only precedes epoch 2
            self.pairs.append((row["epoch_time"], (self.last_pure + pure) / 2))
        self.last_pure = pure


def measure(data_dir: str, workdir: str, batchsize: int, loop: str, epochs: int, **extra) -> dict:
    """One trainer run (fc NP; epochs >= 2) and its pure steps: a row of seconds and ratios."""
    hook = _PureEpochs()
    cfg = train.Config(
        **{
            "data_dir": data_dir,
            "workdir": workdir,
            "network": "fc",
            "update_rule": "np",
            "batchsize": batchsize,
            "num_epochs": epochs,
            "eval_train": False,
            "validation_size": 0,
            "checkpoint_every_epochs": 0,
            **LOOPS[loop],
            **extra,
        }
    )
    rows, _ = train.run(cfg, hooks=[hook])
    # Each epoch against the pure epochs timed around it (the same load); the median ratio
    # (the upper one of an even count)
    pairs = sorted(hook.pairs, key=lambda p: p[0] / p[1])
    epoch_s, pure_s = pairs[len(pairs) // 2]
    steps = hook.steps
    return dict(
        network="fc",
        update_rule="np",
        batchsize=batchsize,
        loop=loop,
        **{k: v for k, v in LOOPS[loop].items()},
        steps_per_epoch=steps,
        calls_per_epoch=len(hook.sizes),
        trainer_epoch_s=epoch_s,
        pure_epoch_s=pure_s,
        pure_step_ms=1e3 * pure_s / steps,
        host_us_per_step=1e6 * (epoch_s - pure_s) / steps,
        overhead=epoch_s / pure_s - 1,
        ratios=[p[0] / p[1] for p in hook.pairs],
    )


def main(argv=None) -> None:
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="", help="holding MNIST; empty: synthetic data")
    ap.add_argument("--batchsizes", default="128,1024", type=comma_list(_positive_int))
    ap.add_argument("--loops", default="before,after,k4", type=comma_list(_loop_name))
    ap.add_argument("--epochs", type=int, default=4, help="epoch 1 (compiling) is left out")
    ap.add_argument("--examples", type=_positive_int, default=60000, help="synthetic data's size")
    ap.add_argument("--quick", action="store_true", help="smoke run: 800 synthetic examples")
    ap.add_argument("--out", default="benchmarks/results/loop_overhead.jsonl")
    ap.add_argument(
        "--budget_s",
        type=float,
        default=0.0,
        help="> 0: a loop that would start past this many seconds (the last one's time as its "
        "estimate) is recorded as skipped (gpu_suite's share)",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    batches, loops = args.batchsizes, args.loops
    if args.epochs < 2:
        ap.error(f"--epochs={args.epochs}: at least 2 (the first compiles and is left out)")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if args.quick or not data_dir or not os.path.isdir(os.path.join(data_dir, "mnist")):
            data_dir = synthetic_mnist(
                os.path.join(tmp, "data"), 800 if args.quick else args.examples
            )
        rows, cost = [], 0.0
        for b in [8] if args.quick else batches:
            for loop in loops:
                extra = dict(n_hl=1, hl_size=16) if args.quick else {}
                epochs = 2 if args.quick else args.epochs
                start = time.perf_counter()
                if args.budget_s > 0 and start + cost > t0 + args.budget_s:
                    row = dict(network="fc", batchsize=b, loop=loop, skipped="over the budget")
                else:
                    workdir = os.path.join(tmp, f"{b}-{loop}")
                    row = measure(data_dir, workdir, b, loop, epochs, **extra)
                    cost = time.perf_counter() - start
                row.update(device_kind=jax.devices()[0].device_kind, quick=args.quick)
                rows.append(row)
                files.append_jsonl(args.out, [row])
                print(files.json_text(row, indent=None), flush=True)
    print(loop_table([r for r in rows if "skipped" not in r]))


if __name__ == "__main__":
    sys.exit(main())
