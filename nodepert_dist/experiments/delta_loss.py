"""delta-loss: the loss change of each update on its own batch, k times per epoch, NP and SGD.

    python -m nodepert_dist.experiments delta-loss --rules=np,sgd --lrs=0.02,1.0 --per_epoch=10

At --per_epoch evenly spaced points of every epoch, for --window consecutive updates each:
dL = L(w_after; batch) - L(w_before; batch), the batch being the one the update was computed
on (L(w_before) is the train step's own loss; L(w_after) one extra forward, only on the
measured steps). Rows: one per measured update (delta_loss.jsonl per run, appended as it
trains; a rerun resumes); delta_loss.csv holds the window means, delta_loss.png plots them.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from nodepert_dist import files, losses, metrics
from nodepert_dist.experiments import common

flags.DEFINE_list("rules", ["np", "sgd"], "Update rules, one run each.")
flags.DEFINE_integer("per_epoch", 10, "Measuring points per epoch.")
flags.DEFINE_integer("window", 5, "Consecutive updates averaged at each point.")
FLAGS = flags.FLAGS


class Hook:
    """Training-loop hook: dL of the updates at the measuring points -> JSONL."""

    def __init__(self, path: str, per_epoch: int, window: int):
        self.path, self.per_epoch, self.window = path, per_epoch, window

    def start(self, ctx) -> None:
        if ctx.state.decor is not None:  # its loss is compiled once, R moves every step
            raise ValueError("the delta-loss measurement does not take --decorrelate; drop it")
        n = self.n = ctx.steps_per_epoch
        self.points = {}  # position in the epoch -> measuring point
        for k in range(min(self.per_epoch, n)):
            offset = k * n // min(self.per_epoch, n)
            for p in range(offset, min(offset + self.window, n)):
                self.points.setdefault(p, k)
        loss_fn = losses.get(ctx.cfg.loss)
        model, self.prep = ctx.model, ctx.run.prep  # after_step's x: the uint8 batch
        self.loss = jax.jit(lambda p, x, y: jnp.mean(loss_fn(model.apply({"params": p}, x), y)))
        if metrics.is_writer():
            files.write_jsonl(
                self.path, [r for r in files.read_jsonl(self.path) if r["step"] <= ctx.step]
            )

    def after_step(self, step, state, x, labels, step_metrics) -> None:
        position = (step - 1) % self.n  # step counts updates: update `step` is at this position
        if position not in self.points:
            return
        after = float(self.loss(state.params, self.prep(x), labels))
        m = jax.device_get(step_metrics)
        before = float(m["loss_sum"]) / float(m["count"])
        row = {
            "step": step,
            "epoch": (step - 1) // self.n + 1,
            "point": self.points[position],
            "loss_before": before,
            "loss_after": after,
            "delta_loss": after - before,
        }
        if metrics.is_writer():
            files.append_jsonl(self.path, [row])


def window_means(rows: list[dict], rule: str, lr: float, steps_per_epoch: int) -> list[dict]:
    out = {}
    for r in rows:
        out.setdefault((r["epoch"], r["point"]), []).append(r)
    table = []
    for (epoch, point), group in sorted(out.items()):
        # float arrays: a non-finite loss was written as null (files.py), read back as NaN
        d = np.array([g["delta_loss"] for g in group], float)
        before = np.array([g["loss_before"] for g in group], float)
        table.append(
            {
                "rule": rule,
                "lr": lr,
                "epoch": epoch,
                "point": point,
                "epoch_frac": (group[0]["step"] - 1) / steps_per_epoch,
                "updates": len(d),
                "delta_loss": float(np.mean(d)),
                "rel_delta_loss": float(np.mean(d / before)),
                "loss_before": float(np.mean(before)),
            }
        )
    return table


def plot(table, path, base) -> str:
    fig, axes = common.figure(1, 2)
    for i, rule in enumerate(sorted({r["rule"] for r in table})):
        rows = [r for r in table if r["rule"] == rule]
        for ax, key in zip(axes[0], ("delta_loss", "rel_delta_loss")):
            ax.plot(
                [r["epoch_frac"] for r in rows],
                [r[key] for r in rows],
                "o-",
                ms=2,
                lw=1,
                color=f"C{i}",
                label=f"{rule.upper()} lr {rows[0]['lr']:g}",
            )
    for ax, ylabel in zip(axes[0], ("loss change per update", "loss change / loss")):
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-5 if ylabel.startswith("loss change per") else 1e-3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{base.network} {base.n_hl}x{base.hl_size} on {base.dataset}, batch "
        f"{base.batchsize}: mean of each window of updates",
        fontsize=9,
    )
    return common.save_figure(fig, path)


def run(base, out, rules, lrs, per_epoch=10, window=5) -> list[str]:
    if per_epoch <= 0 or window <= 0:
        raise common.ExperimentError("--per_epoch and --window must be positive")
    if len(lrs) not in (1, len(rules)):
        raise common.ExperimentError(f"--lrs: give one lr, or one per rule ({len(rules)})")
    lrs = lrs * len(rules) if len(lrs) == 1 else lrs
    table = []
    for rule, lr in zip(rules, lrs):
        cfg = dataclasses.replace(
            base,
            update_rule=rule,
            lr=lr,
            workdir=os.path.join(out, "runs", f"update_rule={rule},lr={lr:g}"),
        )
        jsonl = os.path.join(cfg.workdir, "delta_loss.jsonl")
        hook = Hook(jsonl, per_epoch, window)
        common.train_once(cfg, hooks=[hook])
        table += window_means(files.read_jsonl(jsonl), rule, lr, hook.n)
    if not table:
        raise common.ExperimentError("no updates were measured")
    return [
        common.write_csv(os.path.join(out, "delta_loss.csv"), table),
        plot(table, os.path.join(out, "delta_loss.png"), base),
    ]


def _main():
    bad = set(FLAGS.rules) - {"np", "sgd"}
    if bad:
        raise common.ExperimentError(f"--rules: {', '.join(sorted(bad))} is not np or sgd")
    base = common.base_config("delta-loss")
    default = [base.lr if r == "np" else 1.0 for r in FLAGS.rules]
    return run(
        base,
        common.out_dir("delta-loss"),
        FLAGS.rules,
        common.lrs(default),
        FLAGS.per_epoch,
        FLAGS.window,
    )


main = common.command(_main)
