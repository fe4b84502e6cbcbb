"""`nodepert-plot`: learning curves (test accuracy vs epoch) of several runs in one PNG.

    nodepert-plot --workdirs=runs/np,runs/sgd --out=runs/np_vs_sgd.png
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from nodepert_dist.metrics import read_jsonl

flags.DEFINE_list("workdirs", None, "Run directories (each with metrics.jsonl).", required=True)
flags.DEFINE_string("out", "learning_curves.png", "Output PNG.")
flags.DEFINE_string("metric", "test_acc", "Metric to plot against epoch (a metrics.jsonl key).")
FLAGS = flags.FLAGS


def run_label(workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return os.path.basename(os.path.normpath(workdir))
    with open(path) as f:
        c = json.load(f)
    extras = [c["optimizer"], c["loss"]]
    if c.get("lr_schedule", "constant") != "constant":
        extras.append(c["lr_schedule"])
    if c["update_rule"] == "np":  # the estimator options that are set (perturbation.py)
        extras += [name for name, on in (
            ("antithetic", c.get("np_antithetic")), (f"{c.get('np_draws')} draws",
                                                     c.get("np_draws", 1) > 1),
            ("jvp", c.get("np_delta") == "jvp"), ("layerwise", c.get("np_layerwise")),
            ("weight norm", c.get("weight_norm"))) if on]
    return f"{c['update_rule'].upper()} {c['network']} lr={c['lr']:g} ({', '.join(extras)})"


def plot(workdirs: list[str], out: str, metric: str = "test_acc") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for workdir in workdirs:
        rows = [r for r in read_jsonl(workdir) if r.get(metric) is not None]
        if not rows:
            raise ValueError(f"{workdir}: no '{metric}' values in metrics.jsonl; has the run started?")
        scale = 100.0 if metric.endswith("_acc") else 1.0
        ax.plot([r["epoch"] for r in rows], [scale * r[metric] for r in rows], marker="o",
                markersize=3, label=run_label(workdir))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if metric.endswith("_acc") else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv):
    del argv
    try:
        print(plot(FLAGS.workdirs, FLAGS.out, FLAGS.metric))
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}")


def cli():
    app.run(main)


if __name__ == "__main__":
    cli()
