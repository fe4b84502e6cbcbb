"""linesearch: at a given accuracy, the change in loss after one NP step and one SGD step over a
log-spaced lr grid; the critical lr (the smallest whose step raises the loss) and the optimal
lr (the largest drop), and how both move with network width.

    python -m nodepert_dist.experiments linesearch --widths=100,300,1000 --target_acc=0.9

For each width a network is trained (the preset: SGD, which gets there fastest; any training
flag changes it) until test accuracy reaches --target_acc (every epoch is checkpointed; the first
epoch at or above the target is used, else the best one). Then, on --probe_size training
examples (default: one batch of --batchsize; NP's variance, and so its critical lr, depends on
it): dL_SGD(lr) = L(w - lr g) - L(w) with g = jax.grad, and dL_NP(lr), the mean over --draws
NP estimates of the run's own estimator (every --np_* setting, --noise and --sigma). Writes linesearch.csv (width, rule, lr, delta_loss), linesearch_lrs.csv (critical
and optimal lr per width and rule) and linesearch.png.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from nodepert_dist import losses
from nodepert_dist.experiments import common, probes

flags.DEFINE_list("widths", ["100", "300", "1000"], "hl_size values.")
flags.DEFINE_float("target_acc", 0.9, "Test accuracy (0..1) at which to measure.")
flags.DEFINE_integer(
    "draws",
    8,
    "NP draws averaged per lr, each an estimate of the run's own "
    "estimator (--np_* settings included).",
)
flags.DEFINE_integer(
    "probe_size",
    0,
    "Training examples the step is computed and the loss "
    "change measured on (0: --batchsize, one training step's batch).",
)
FLAGS = flags.FLAGS

DEFAULT_LRS = common.log_grid(1e-3, 100.0, 16)


def delta_fn(run, model, *, batch: int, draws: int):
    """Jitted f(params, x, y, lrs) -> (L(w), dL_SGD per lr, dL_NP per lr and draw); the NP
    steps are `draws` estimates of the run's own estimator (probes.np_estimates: all its NP
    settings) on the `batch` examples."""
    loss_fn = losses.get(run.cfg.loss)
    gradient = run.gradient(batch, update_rule="np")

    def mean_loss(p, x, y):
        return jnp.mean(loss_fn(model.apply({"params": p}, x), y))

    def f(params, x, y, lrs):
        start, g = jax.value_and_grad(mean_loss)(params, x, y)
        estimates = probes.np_estimates(gradient, model, params, x, y, draws)

        def change(direction, lr):
            return mean_loss(jax.tree.map(lambda p, d: p - lr * d, params, direction), x, y) - start

        def at(lr):
            return change(g, lr), jax.vmap(lambda d: change(d, lr))(estimates)

        sgd, np_ = jax.lax.map(at, lrs)
        return start, sgd, np_

    return jax.jit(f)


def critical_and_optimal(lrs, deltas) -> tuple:
    """(smallest lr whose step raises the loss or None, lr of the largest drop)."""
    up = [lr for lr, d in zip(lrs, deltas) if not d < 0]  # NaN counts as a rise
    finite = [d if np.isfinite(d) else np.inf for d in deltas]
    return (min(up) if up else None), lrs[int(np.argmin(finite))]


def measure(base, out, width, lrs, target, draws, probe_size):
    cfg = dataclasses.replace(
        base,
        hl_size=width,
        keep_checkpoints=0,
        checkpoint_every_epochs=1,
        crash_guard=False,
        workdir=os.path.join(out, "runs", f"hl_size={width}"),
    )
    result = common.train_once(cfg)
    rows = [r for r in result["rows"] if r["epoch"] > 0]
    if not rows:
        raise common.ExperimentError(f"width {width}: the run ({result['status']}) has no epochs")
    reached = [r for r in rows if r["test_acc"] >= target]
    point = reached[0] if reached else max(rows, key=lambda r: r["test_acc"])
    run, model, params = common.load_point(cfg, point["step"])
    x, y = probes.probe_batch(run.data, run.splits, run.prep_mode, probe_size, cfg.seed)
    f = delta_fn(run, model, batch=len(y), draws=draws)
    device = jax.local_devices()[0]
    start, sgd, np_ = jax.device_get(
        f(
            params,
            jax.device_put(x, device),
            jax.device_put(y, device),
            jnp.asarray(lrs, jnp.float32),
        )
    )
    at = {
        "width": width,
        "epoch": point["epoch"],
        "test_acc": point["test_acc"],
        "reached_target": bool(reached),
        "probe_size": probe_size,
        "loss": float(start),
    }
    table = []
    for i, lr in enumerate(lrs):
        table.append(
            {**at, "rule": "sgd", "lr": lr, "delta_loss": float(sgd[i]), "delta_loss_std": 0.0}
        )
        table.append(
            {
                **at,
                "rule": "np",
                "lr": lr,
                "delta_loss": float(np.mean(np_[i])),
                "delta_loss_std": float(np.std(np_[i])),
            }
        )
    summary = []
    for rule in ("np", "sgd"):
        deltas = [r["delta_loss"] for r in table if r["rule"] == rule]
        critical, optimal = critical_and_optimal(lrs, deltas)
        summary.append(
            {
                **at,
                "rule": rule,
                "critical_lr": critical,
                "optimal_lr": optimal,
                "best_delta_loss": float(np.nanmin(deltas)),
            }
        )
    return table, summary


def plot(table, summary, path, base, target) -> str:
    fig, axes = common.figure(1, 2)
    ax = axes[0, 0]
    widths = sorted({r["width"] for r in table})
    for i, w in enumerate(widths):
        for rule, style in (("np", "-"), ("sgd", "--")):
            rows = [r for r in table if r["width"] == w and r["rule"] == rule]
            ax.plot(
                [r["lr"] for r in rows],
                [r["delta_loss"] for r in rows],
                style,
                color=f"C{i}",
                label=f"{rule.upper()} width {w}",
            )
    ax.axhline(0, color="k", lw=0.5)
    common.log_axis(ax)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss change after one step")
    ax.set_title(f"{base.network} on {base.dataset} at test acc ~{100 * target:g}%", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for rule, color in (("np", "C0"), ("sgd", "C1")):
        rows = [r for r in summary if r["rule"] == rule]
        for key, marker, style in (("critical_lr", "o", "-"), ("optimal_lr", "s", ":")):
            pts = [(r["width"], r[key]) for r in rows if r[key] is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    marker=marker,
                    color=color,
                    label=f"{rule.upper()} {key.replace('_lr', '')} lr",
                )
    common.log_axis(ax, ticks=sorted({r["width"] for r in summary}))
    common.log_axis(ax, "y")
    ax.set_xlabel("hidden layer width")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


def run(base, out, widths, lrs, target=0.9, draws=8, probe_size=0) -> list[str]:
    if not 0 < target <= 1 or draws < 1 or probe_size < 0:
        raise common.ExperimentError("--target_acc in (0, 1], --draws > 0, --probe_size >= 0")
    probe_size = probe_size or base.batchsize
    probes.check_probe_size(probe_size, base)  # before any training
    table, summary = [], []
    for w in widths:
        t, s = measure(base, out, w, lrs, target, draws, probe_size)
        table += t
        summary += s
    return [
        common.write_csv(os.path.join(out, "linesearch.csv"), table),
        common.write_csv(os.path.join(out, "linesearch_lrs.csv"), summary),
        plot(table, summary, os.path.join(out, "linesearch.png"), base, target),
    ]


def _main():
    return run(
        common.base_config("linesearch"),
        common.out_dir("linesearch"),
        common.int_list(FLAGS.widths, "widths"),
        common.lrs(DEFAULT_LRS),
        FLAGS.target_acc,
        FLAGS.draws,
        FLAGS.probe_size,
    )


main = common.command(_main)
