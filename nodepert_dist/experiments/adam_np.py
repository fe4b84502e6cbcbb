"""adam-np: NP gradients fed to Adam vs plain NP (w <- w - lr*g) over an lr grid.

    python -m nodepert_dist.experiments adam-np --lrs=1e-5,1e-4,1e-3,1e-2,1e-1 --seeds=2

The same machinery as vary-lr (ordinary runs through nodepert_dist.sweep, resumable), with the
optimizer as the series: writes <out>/adam_np.csv (one row per run) and adam_np.png (final and
best test accuracy vs lr; Adam's good lrs sit orders of magnitude below plain NP's).
"""

from __future__ import annotations

import dataclasses

from nodepert_dist.experiments import common, vary_lr

DEFAULT_LRS = common.log_grid(1e-5, 1.0, 11)
_LABELS = {"sgd": "NP", "adam": "NP + Adam"}


def run(base, out, lrs, seeds, launch="inprocess", parallel=1, as_population=False) -> list[str]:
    base = dataclasses.replace(base, update_rule="np")
    return vary_lr.lr_sweep(
        base,
        out,
        "adam_np",
        "optimizer",
        ["sgd", "adam"],
        lrs,
        seeds,
        launch,
        parallel,
        label=_LABELS.get,
        as_population=as_population,
    )[1]


def _main():
    return run(
        common.base_config("adam-np"),
        common.out_dir("adam-np"),
        common.lrs(DEFAULT_LRS),
        common.FLAGS.seeds,
        common.FLAGS.launch,
        common.FLAGS.parallel,
        common.FLAGS.as_population,
    )


main = common.command(_main)
