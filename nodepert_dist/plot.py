"""`nodepert-plot`: learning curves of several runs in one PNG.

    nodepert-plot --workdirs=runs/np,runs/sgd --out=runs/np_vs_sgd.png
    nodepert-plot --workdirs=runs/np,runs/sgd --metric=test_loss --x=time --out=runs/loss.png

A metric of metrics.jsonl (test accuracy by default; any *_acc or *_loss key) against the epoch
or against wall-clock training time (--x=time: the cumulative epoch_time, evaluation excluded).
The title names the dataset and network; each legend entry names the update rule and, for NP,
its noise scale and optimizer apart from the rule; a --population run draws one line per
member, named by its index and settings.
"""

from __future__ import annotations

import itertools
import os

from absl import app, flags

from nodepert_dist import cli as cli_lib
from nodepert_dist import files
from nodepert_dist.run_record import by_member, epoch_rows, member_label, read_metrics

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs: as a library (`plot()`, `run_label()`) this
    module adds nothing to absl's global flags, where `--out` would clash with the experiments'."""
    flags.DEFINE_list(
        "workdirs", None, "Run directories (each with metrics.jsonl and config.json)."
    )
    flags.DEFINE_string("out", "learning_curves.png", "Output PNG.")
    flags.DEFINE_string(
        "metric",
        "test_acc",
        "Metric to plot (a metrics.jsonl key: test_acc, "
        "train_acc, val_acc, test_loss, train_loss, mean_step_loss, ...).",
    )
    flags.DEFINE_enum(
        "x",
        "epoch",
        ["epoch", "time"],
        "x axis: epoch, or wall-clock training time in seconds (cumulative epoch_time).",
    )


def _config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    return files.read_json(path)  # a hand-edited copy may carry a BOM; errors name the file


def run_label(workdir: str) -> str:
    c = _config(workdir)
    if "update_rule" not in c:
        return os.path.basename(os.path.normpath(workdir))
    rule = c["update_rule"]
    # a --population's varying settings are named per member (member_label), not here
    varying = {part.split(":")[0].strip() for part in c.get("population", "").split(";")}
    optimizer = c["optimizer"] + (
        f", {c['lr_schedule']} lr" if c.get("lr_schedule", "constant") != "constant" else ""
    )
    if rule == "np":
        sigma = f", sigma={c['sigma']:g}" if c.get("sigma") and "sigma" not in varying else ""
        options = "".join(
            f", {name}"
            for name, on in (  # the estimator options set
                ("antithetic", c.get("np_antithetic")),
                (f"{c.get('np_draws')} draws", c.get("np_draws", 1) > 1),
                ("jvp", c.get("np_delta") == "jvp"),
                ("layerwise", c.get("np_layerwise")),
                ("original estimator, biased", c.get("np_estimator") == "original"),
                ("noise shared by the batch", c.get("np_estimator") == "shared_noise"),
                ("local losses", c.get("np_local")),
                ("weight norm", c.get("weight_norm")),
            )
            if on
        )
        what = f"NP (node perturbation{sigma}{options}; {optimizer} optimizer)"
    else:
        what = f"{rule.upper()} (backprop; {optimizer} optimizer)"
    lr = "" if "lr" in varying else f", lr={c['lr']:g}"
    return f"{what}{lr}, {c['loss']} loss"


def title(workdirs: list[str]) -> str:
    configs = [_config(w) for w in workdirs]
    datasets = sorted({c.get("dataset", "?") for c in configs})
    networks = sorted({c.get("network", "?") for c in configs})
    return f"{', '.join(datasets)}: {', '.join(networks)}"


def curves(workdir: str, metric: str = "test_acc", x: str = "epoch") -> list[tuple]:
    """[(label, xs, ys)]: the run's curve, or one per member of a --population run (labelled
    with its index and settings)."""
    rows = [r for r in epoch_rows(read_metrics(workdir)) if r.get(metric) is not None]
    if not rows:
        raise ValueError(f"{workdir}: no '{metric}' values in metrics.jsonl; has the run started?")
    out = []
    for member in by_member(rows).values():
        if x == "time":  # epoch 0 (before training) at t=0
            xs = list(itertools.accumulate(r.get("epoch_time") or 0.0 for r in member))
        else:
            xs = [r["epoch"] for r in member]
        label = ", ".join(filter(None, (run_label(workdir), member_label(member[0]))))
        out.append((label, xs, [r[metric] for r in member]))
    return out


def plot(workdirs: list[str], out: str, metric: str = "test_acc", x: str = "epoch") -> str:
    missing = [w for w in workdirs if not os.path.isdir(w)]
    if missing:
        raise ValueError(f"--workdirs: {missing[0]} is not a folder (a run's --workdir)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    scale = 100.0 if metric.endswith("_acc") else 1.0
    for workdir in workdirs:
        for label, xs, ys in curves(workdir, metric, x):
            ax.plot(xs, [scale * y for y in ys], marker="o", markersize=3, label=label)
    ax.set_title(title(workdirs))
    ax.set_xlabel("epoch" if x == "epoch" else "training time (s)")
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if metric.endswith("_acc") else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with files.atomic_open(out, "wb") as f:  # the format from the name, as savefig(out) does
        fig.savefig(f, format=os.path.splitext(out)[1][1:] or None)
    plt.close(fig)
    return out


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdirs:
        raise SystemExit("error: --workdirs is required, e.g. --workdirs=runs/np,runs/sgd")
    try:
        print(plot(FLAGS.workdirs, FLAGS.out, FLAGS.metric, FLAGS.x))
    except (ValueError, KeyError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def cli():
    define_flags()
    app.run(
        main,
        flags_parser=lambda argv: cli_lib.parse_flags(
            argv, "nodepert-plot", __doc__, {"flags": __name__}
        ),
    )


if __name__ == "__main__":
    cli()
