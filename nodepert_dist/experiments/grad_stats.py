"""grad-stats: while NP (or SGD) trains, every k steps compare the NP update with the true
gradient (`jax.grad`) on one fixed probe batch of training examples. The NP update measured is
the run's own estimator, every --np_* setting, --noise and --sigma included (probes.py).

    python -m nodepert_dist.experiments grad-stats --every=100 --draws=8 --num_epochs=5

Per layer and for the whole network: angle, sign symmetry, norms and the NP/SGD step-size ratio
of one NP draw; the angle of the mean of --draws draws; the NP estimate's variance over draws
(experiments/probes.py). The statistics are a separate jitted function called only on the
steps they measure. Writes <out>/grad_stats.jsonl (appended as it trains; a rerun resumes the
run and drops rows past its checkpoint), grad_stats.csv and grad_stats.png.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags

from nodepert_dist.experiments import common, probes

flags.DEFINE_integer("every", 100, "Measure every this many steps (and at step 0).")
flags.DEFINE_integer(
    "draws",
    8,
    "NP draws per measurement (variance, angle of the mean), each "
    "an estimate of the run's own estimator (--np_* settings included).",
)
flags.DEFINE_integer("probe_size", 512, "Training examples in the fixed probe batch.")
FLAGS = flags.FLAGS


def plot(rows: list[dict], path: str, title: str) -> str:
    fig, axes = common.figure(2, 2, size=(5.2, 3.6))
    steps = [r["step"] for r in rows]
    panels = [
        ("angle", "angle to the true gradient (deg)", False),
        ("sign_sym", "sign symmetry", False),
        ("ratio", "NP / SGD step size", True),
        ("rel_var", "NP variance / |grad|^2", True),
    ]
    for ax, (stat, ylabel, log) in zip(axes.ravel(), panels):
        for i, name in enumerate(["all"] + probes.layer_names(rows)):
            ys = [r.get(f"{name}_{stat}", np.nan) for r in rows]
            ax.plot(
                steps,
                ys,
                color="k" if name == "all" else f"C{i}",
                lw=2 if name == "all" else 1,
                label="whole network" if name == "all" else name,
            )
        if stat == "angle":
            ax.plot(
                steps,
                [r["all_angle_mean"] for r in rows],
                "k--",
                lw=1,
                label="whole, mean of draws",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return common.save_figure(fig, path)


def run(base, out: str, every: int, draws: int, probe_size: int) -> list[str]:
    if every <= 0 or draws < 2 or probe_size <= 0:
        raise common.ExperimentError("--every and --probe_size must be positive, --draws >= 2")
    cfg = dataclasses.replace(base, workdir=os.path.join(out, "run"))
    jsonl = os.path.join(out, "grad_stats.jsonl")
    common.train_once(cfg, hooks=[probes.Hook(jsonl, every, draws, probe_size)])
    rows = common.jsonl_to_csv(jsonl, os.path.join(out, "grad_stats.csv"))
    if not rows:
        raise common.ExperimentError(f"no statistics in {jsonl}")
    png = plot(
        rows,
        os.path.join(out, "grad_stats.png"),
        f"{cfg.update_rule.upper()} training, {cfg.network} {cfg.n_hl}x{cfg.hl_size}, "
        f"lr {cfg.lr:g}; probe {probe_size} examples, {draws} NP draws",
    )
    return [jsonl, os.path.join(out, "grad_stats.csv"), png]


def _main():
    return run(
        common.base_config("grad-stats"),
        common.out_dir("grad-stats"),
        FLAGS.every,
        FLAGS.draws,
        FLAGS.probe_size,
    )


main = common.command(_main)
