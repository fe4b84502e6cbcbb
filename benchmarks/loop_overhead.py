"""A trainer step split into device time and host overhead: the train loop's epoch time against
the same compiled steps on a device-resident batch.

    PYTHONPATH=. python benchmarks/loop_overhead.py --data_dir=data        # MNIST, fc NP
    PYTHONPATH=. python benchmarks/loop_overhead.py --quick                # CPU smoke run

For each batch size and each loop setting (`before`: --metrics_every=1 --steps_per_call=1, a
metrics read per step as the loop did before issue 22; `after`: the defaults; `k4`, `k16`:
--steps_per_call=4/16; `device`, `device_k16`: --data_on_device, 1 or 16 steps a call), the real train loop (`train.run`: data pipeline, host batches, metric
reads) runs --epochs epochs of fc NP; its epoch time (`epoch_time` of the rows, epoch 1 left
out: it compiles) is set against the pure compiled steps: the loop's own program
(`Run.loop.call`) called back to back on one batch already on the device, timed by a hook right
after each epoch (both under the same load on a shared machine); the row is the epoch with the
median ratio. overhead = trainer / pure - 1: what the host adds.
Target on CPU: within 5% (issue 22). Without --data_dir (or without MNIST there) the data are
synthetic MNIST-shaped uint8 images (--examples of them). Output: JSON lines (--out) and a
markdown table on stdout; benchmarks/gpu_suite.py's `loop` section runs this script.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bf16_sigma import comma_list
from gpu_suite_table import loop_table

from nodepert_dist import cli, files, train
from nodepert_dist import mesh as mesh_lib
from nodepert_dist.data import store
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


class _PureSteps:
    """Hook: the loop's compiled call back to back on one resident batch (a copy of the state:
    the call donates it), compiled and warmed up at the run's start, timed after each epoch's
    row (`pairs`: (epoch seconds, pure seconds per step), both under the same load)."""

    def __init__(self, min_s: float):
        self.min_s, self.pairs = min_s, []

    def start(self, ctx) -> None:
        loop, b, self.steps = ctx.run.loop, ctx.cfg.batchsize, ctx.steps_per_epoch
        self.loop, k = loop, loop.steps_per_call
        x = np.asarray(ctx.data.train_x[: k * b])
        y = np.asarray(ctx.data.train_y[: k * b])
        if k > 1:
            self.batch = mesh_lib.global_batch(
                ctx.mesh, x.reshape(k, b, *x.shape[1:]), y.reshape(k, b), stacked=True
            )
        else:
            self.batch = mesh_lib.global_batch(ctx.mesh, x, y)
        self.state, self.log = jax.tree.map(jnp.copy, ctx.state), loop.new_log()
        self._calls(2)  # compiles the program the trainer then reuses

    def _calls(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.state, self.log, m = self.loop.call(self.state, self.log, *self.batch)
        jax.block_until_ready((self.state, self.log, m))
        return time.perf_counter() - start

    def after_row(self, row, rows) -> None:
        if row["epoch"] < 2:  # epoch 1 compiles
            return
        calls, best = 1, float("inf")
        for _ in range(3):  # the least of 3 rounds of >= min_s each
            while (took := self._calls(calls)) < self.min_s:
                calls *= 2
            best = min(best, took / (calls * self.loop.steps_per_call))
        self.pairs.append((row["epoch_time"], best))


def measure(data_dir: str, workdir: str, batchsize: int, loop: str, epochs: int, **extra) -> dict:
    """One trainer run (fc NP; epochs >= 2) and its pure steps: a row of seconds and ratios."""
    hook = _PureSteps(min_s=0.2 if epochs > 2 else 0.0)
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
    # Each epoch against the pure steps timed right after it (the same load); the median ratio
    # (the upper one of an even count)
    pairs = sorted(hook.pairs, key=lambda p: p[0] / p[1])
    epoch_s, pure_step = pairs[len(pairs) // 2]
    steps = hook.steps
    return dict(
        network="fc",
        update_rule="np",
        batchsize=batchsize,
        loop=loop,
        **{k: v for k, v in LOOPS[loop].items()},
        steps_per_epoch=steps,
        trainer_epoch_s=epoch_s,
        pure_epoch_s=pure_step * steps,
        pure_step_ms=1e3 * pure_step,
        host_us_per_step=1e6 * (epoch_s - pure_step * steps) / steps,
        overhead=epoch_s / (pure_step * steps) - 1,
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
