"""scaling: final test accuracy and the largest stable lr vs width (hl_size) and depth (n_hl).

    python -m nodepert_dist.experiments scaling --widths=100,300,1000 --depths=1,2,3,4 --lrs=0.003,0.01,0.03,0.1

Two lr sweeps of ordinary runs (nodepert_dist.sweep, resumable): widths at the preset's depth and
depths at the preset's width. Per width/depth: the best final accuracy over lrs (mean over
seeds) and the largest stable lr: every seed finished with no crash (no test accuracy
--crash_points below its best so far, no non-finite loss) and a final accuracy within
--crash_points of the best run at that width/depth (a run that never learns is not stable). Writes scaling_runs.csv (one row per
run), scaling.csv (one row per width/depth) and scaling.png.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from nodepert_dist.experiments import common

flags.DEFINE_list("widths", ["100", "300", "1000"], "hl_size values (at the preset's n_hl).")
flags.DEFINE_list("depths", ["1", "2", "3", "4"], "n_hl values (at the preset's hl_size).")
FLAGS = flags.FLAGS

DEFAULT_LRS = common.log_grid(1e-3, 0.3, 6)


def aggregate(rows: list[dict], key: str, points: float) -> list[dict]:
    out = []
    for value in sorted({r[key] for r in rows}):
        mine = [r for r in rows if r[key] == value]
        by_lr = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)
        means = {
            lr: np.mean([r["final_acc"] for r in rs])
            for lr, rs in by_lr.items()
            if all(r["final_acc"] is not None for r in rs)
        }
        top = max((r["final_acc"] for r in mine if r["final_acc"] is not None), default=None)
        stable = [
            lr
            for lr, rs in by_lr.items()
            if all(
                r["status"] == "finished"
                and r["crash_epoch"] is None
                and 100 * (top - r["final_acc"]) <= points
                for r in rs
            )
        ]
        best_lr = max(means, key=means.get) if means else None
        out.append(
            {
                "sweep": "width" if key == "hl_size" else "depth",
                key: value,
                "best_final_acc": float(means[best_lr]) if best_lr else None,
                "best_lr": best_lr,
                "largest_stable_lr": max(stable) if stable else None,
                "lrs_tried": len(by_lr),
            }
        )
    return out


def plot(summary, path, base) -> str:
    fig, axes = common.figure(2, 2, size=(5.0, 3.4))
    for col, (key, label) in enumerate(
        (("hl_size", "hidden layer width"), ("n_hl", "hidden layers"))
    ):
        rows = [r for r in summary if key in r]
        xs = [r[key] for r in rows]
        for row, (stat, ylabel, scale) in enumerate(
            (
                ("best_final_acc", "final test accuracy (%), best lr", 100),
                ("largest_stable_lr", "largest stable lr", 1),
            )
        ):
            ax = axes[row, col]
            pts = [(x, scale * r[stat]) for x, r in zip(xs, rows) if r[stat] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            if key == "hl_size":
                common.log_axis(ax, ticks=xs)
            if stat.endswith("lr"):
                common.log_axis(ax, "y")
            ax.grid(alpha=0.3)
    fig.suptitle(
        f"{base.update_rule.upper()} {base.network} on {base.dataset}, {base.num_epochs} "
        f"epochs (widths at depth {base.n_hl}, depths at width {base.hl_size})",
        fontsize=9,
    )
    return common.save_figure(fig, path)


def run(
    base, out, widths, depths, lrs, seeds, launch="inprocess", parallel=1, as_population=False
) -> list[str]:
    rows, summary = [], []
    for key, values, folder in (("hl_size", widths, "runs_width"), ("n_hl", depths, "runs_depth")):
        runs = common.run_grid(
            base,
            {key: list(values), "lr": list(lrs)},
            seeds,
            os.path.join(out, folder),
            launch,
            parallel,
            as_population,  # one population per width (depth): its lrs x seeds
        )
        mine = [common.run_summary(r, base.crash_points) for r in runs]
        rows += [
            {
                "sweep": "width" if key == "hl_size" else "depth",
                "hl_size": r["cfg"].hl_size,
                "n_hl": r["cfg"].n_hl,
                **s,
            }
            for r, s in zip(runs, mine)
        ]
        summary += aggregate(mine, key, base.crash_points)
    return [
        common.write_csv(os.path.join(out, "scaling_runs.csv"), rows),
        common.write_csv(os.path.join(out, "scaling.csv"), summary),
        plot(summary, os.path.join(out, "scaling.png"), base),
    ]


def _main():
    return run(
        common.base_config("scaling"),
        common.out_dir("scaling"),
        common.int_list(FLAGS.widths, "widths"),
        common.int_list(FLAGS.depths, "depths"),
        common.lrs(DEFAULT_LRS),
        FLAGS.seeds,
        FLAGS.launch,
        FLAGS.parallel,
        FLAGS.as_population,
    )


main = common.command(_main)
