"""vary-lr: final and best test accuracy over a log-spaced lr grid, NP and SGD, across seeds.

    python -m nodepert_dist.experiments vary-lr --lrs=0.001,0.003,0.01,0.03,0.1 --seeds=2

Runs are ordinary `nodepert-train` runs, one workdir each under <out>/runs (nodepert_dist.sweep
names and launches them: in this process, as local subprocesses, or as a SLURM array); rerun the
command to resume or aggregate. Writes <out>/vary_lr.csv (one row per run) and vary_lr.png.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from nodepert_dist.experiments import common

flags.DEFINE_list("rules", ["np", "sgd"], "Update rules to sweep.")
FLAGS = flags.FLAGS

DEFAULT_LRS = common.log_grid(1e-3, 1.0, 7)


def lr_sweep(
    base,
    out: str,
    name: str,
    series: str,
    values: list,
    lrs: list[float],
    seeds: int,
    launch: str = "inprocess",
    parallel: int = 1,
    label=str,
    as_population: bool = False,
) -> tuple[list[dict], list[str]]:
    """Runs `series` x lr x seed; writes <out>/<name>.csv and .png (accuracy vs lr per series)."""
    runs = common.run_grid(
        base,
        {series: list(values), "lr": list(lrs)},
        seeds,
        os.path.join(out, "runs"),
        launch,
        parallel,
        as_population,
    )
    rows = [common.run_summary(r, base.crash_points) for r in runs]
    csv_path = common.write_csv(os.path.join(out, f"{name}.csv"), rows)
    fig, axes = common.figure()
    ax = axes[0, 0]
    for i, value in enumerate(values):
        color = f"C{i}"
        mine = [r for r in rows if r[series] == value]
        for key, style in (("final_acc", "-o"), ("best_acc", "--")):
            xs, ys = [], []
            for lr in lrs:
                accs = [r[key] for r in mine if r["lr"] == lr and r[key] is not None]
                if accs:
                    xs.append(lr)
                    ys.append(100 * np.mean(accs))
            ax.plot(
                xs,
                ys,
                style,
                color=color,
                markersize=4,
                label=f"{label(value)} {key.split('_')[0]}"
                + (f" (mean of {seeds})" if seeds > 1 else ""),
            )
        bad = [r["lr"] for r in mine if r["status"] in ("diverged", "crashed")]
        if bad:
            ax.plot(bad, [0] * len(bad), "x", color=color, label=f"{label(value)} diverged")
    common.log_axis(ax, ticks=lrs)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{base.network} {base.n_hl}x{base.hl_size} on {base.dataset}, {base.num_epochs} epochs",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    png = common.save_figure(fig, os.path.join(out, f"{name}.png"))
    return rows, [csv_path, png]


def run(
    base, out: str, rules, lrs, seeds: int, launch="inprocess", parallel=1, as_population=False
) -> list[str]:
    return lr_sweep(
        base,
        out,
        "vary_lr",
        "update_rule",
        rules,
        lrs,
        seeds,
        launch,
        parallel,
        label=str.upper,
        as_population=as_population,
    )[1]


def _main():
    base = common.base_config("vary-lr")
    bad = set(FLAGS.rules) - {"np", "sgd"}
    if bad:
        raise common.ExperimentError(f"--rules: {', '.join(sorted(bad))} is not np or sgd")
    return run(
        base,
        common.out_dir("vary-lr"),
        FLAGS.rules,
        common.lrs(DEFAULT_LRS),
        FLAGS.seeds,
        FLAGS.launch,
        FLAGS.parallel,
        common.FLAGS.as_population,
    )


main = common.command(_main)
