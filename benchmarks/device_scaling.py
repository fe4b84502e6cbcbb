"""Scaling of the whole training loop over devices and processes: `nodepert-train` as users run it.

    python benchmarks/device_scaling.py --data_dir=data     # fc on MNIST: 1, 2, 4, 8 devices; 1x8, 2x4, 4x2
    python benchmarks/device_scaling.py --quick             # a tiny smoke run (tests use it)

Every point is one real `nodepert-train` run (2 epochs, no train-set evaluation, no checkpoints)
in fresh processes with that many simulated CPU devices (`--cpu_devices`; several processes go
through launch/local.py), or on GPUs the first N of them. Its rate is epoch 2's `examples_per_s`
from metrics.jsonl (epoch 1 includes compiling): the loop's throughput, input pipeline, batch
assembly, dispatch, collectives and host syncs included.

- strong scaling: the same global batch (--batchsize) over 1, 2, 4, 8 devices;
  efficiency = rate(n) / (n * rate(1)) (1.0 = perfect; real hardware aims there);
- weak scaling: the same per-device batch (--per_device_batch), global batch n times it;
  efficiency = rate(n) / (n * rate(1));
- process layouts: the same devices as P processes x D devices (1x8, 2x4, 4x2) at --batchsize.

What simulated devices on a small CPU can show: the engine's fixed costs per step (dispatch,
batch assembly, host syncs, collectives; in-process for one process, gloo over TCP between
processes) and how they grow with devices and processes. What they cannot show: speed-up. All
simulated devices share the same cores (2 on the development machine), so n devices do the
same arithmetic on the same cores as 1 device plus the overheads: efficiency <= 1/n is the
expected ceiling here, not a defect. Real scaling needs real devices (GPUs, one per process).

Output: JSON lines (--out), a printed table and an efficiency chart (--png).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from absl import app, flags

from nodepert_dist import cli, files, run_record
from nodepert_dist.models import NETWORKS

flags.DEFINE_enum("network", "fc", NETWORKS, "Network (as nodepert-train --network).")
flags.DEFINE_enum("update_rule", "np", ["np", "sgd"], "np or sgd.")
flags.DEFINE_string(
    "data_dir", "data", "Where MNIST lives (python -m nodepert_dist.data fetch mnist)."
)
flags.DEFINE_integer("batchsize", 128, "Global batch of strong scaling and of the layouts.")
flags.DEFINE_integer("per_device_batch", 128, "Per-device batch of weak scaling.")
flags.DEFINE_list(
    "devices", ["1", "2", "4", "8"], "Device counts ('' = none: the process layouts only)."
)
flags.DEFINE_list("layouts", ["1x8", "2x4", "4x2"], "Processes x devices per process.")
flags.DEFINE_list(
    "extra", [], "More nodepert-train flags for every run, e.g. --extra=--hl_size=64."
)
flags.DEFINE_bool("quick", False, "Smoke run: a small net, 8000 training examples, 1-2 devices.")
flags.DEFINE_string("out", "benchmarks/results/device_scaling.jsonl", "JSON lines (appended).")
flags.DEFINE_string("png", "benchmarks/results/device_scaling.png", "Efficiency chart ('' = none).")
flags.DEFINE_integer("timeout_s", 900, "Per run.")
FLAGS = flags.FLAGS
# Checked when the flags are parsed, not after hours of runs.
cli.check_list("devices", pattern=cli.POSITIVE_INT, what="a positive integer")
cli.check_list(
    "layouts",
    pattern=f"{cli.POSITIVE_INT}x{cli.POSITIVE_INT}",
    what="PxD (processes x devices per process, e.g. 2x4)",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_point(processes: int, devices_per_process: int, batch: int, extra: list[str]) -> dict:
    """One nodepert-train run; epoch 2's row of metrics.jsonl."""
    with tempfile.TemporaryDirectory() as workdir:
        train = [
            sys.executable,
            "-m",
            "nodepert_dist.train",
            f"--network={FLAGS.network}",
            f"--update_rule={FLAGS.update_rule}",
            f"--batchsize={batch}",
            "--num_epochs=2",
            "--noeval_train",
            "--checkpoint_every_epochs=0",
            f"--data_dir={FLAGS.data_dir}",
            f"--workdir={workdir}",
            *extra,
        ]
        if processes == 1:
            cmd = train + [f"--cpu_devices={devices_per_process}"]
        else:
            cmd = [
                sys.executable,
                os.path.join(REPO, "launch", "local.py"),
                f"--num_processes={processes}",
                f"--devices_per_process={devices_per_process}",
                f"--timeout_s={FLAGS.timeout_s}",
                "--",
                *train,
            ]
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("XLA_FLAGS", None)
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s + 60, env=env, cwd=REPO
        )
        if out.returncode:
            tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
            raise SystemExit(
                f"error: {processes}x{devices_per_process} B={batch} failed: " + " | ".join(tail)
            )
        row = run_record.read_metrics(workdir)[-1]
    return {
        "network": FLAGS.network,
        "update_rule": FLAGS.update_rule,
        "processes": processes,
        "devices_per_process": devices_per_process,
        "devices": processes * devices_per_process,
        "batchsize": batch,
        "per_device_batch": batch // (processes * devices_per_process),
        "examples_per_s": row["examples_per_s"],
        "epoch_time": row["epoch_time"],
        "extra": extra,
    }


def measure() -> list[dict]:
    extra = list(FLAGS.extra)
    if FLAGS.quick:  # 8000 training examples (the rest held out), a small net
        extra += ["--n_hl=1", "--hl_size=32", "--validation_size=52000"]
    cache: dict = {}

    def point(p, d, b):
        if (p, d, b) not in cache:
            cache[p, d, b] = run_point(p, d, b, extra)
            r = cache[p, d, b]
            print(f"{p}x{d} B={b}: {r['examples_per_s']:,.0f} ex/s", flush=True)
        return dict(cache[p, d, b])

    rows = []
    for n in map(int, FLAGS.devices):
        rows.append(dict(point(1, n, FLAGS.batchsize), mode="strong"))
    for n in map(int, FLAGS.devices):
        rows.append(dict(point(1, n, n * FLAGS.per_device_batch), mode="weak"))
    for layout in FLAGS.layouts:
        p, d = map(int, layout.split("x"))
        rows.append(dict(point(p, d, FLAGS.batchsize), mode="layout"))
    for mode in ("strong", "weak"):
        base = next((r for r in rows if r["mode"] == mode and r["devices"] == 1), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["efficiency"] = r["examples_per_s"] / (r["devices"] * base["examples_per_s"])
    base = (
        next(r for r in rows if r["mode"] == "layout" and r["processes"] == 1)
        if any(r["mode"] == "layout" and r["processes"] == 1 for r in rows)
        else None
    )
    for r in rows:
        if r["mode"] == "layout" and base:
            r["vs_one_process"] = r["examples_per_s"] / base["examples_per_s"]
    return rows


def report(rows: list[dict]) -> None:
    print(
        f"{'mode':<8}{'layout':>7}{'B':>6}{'B/dev':>6}{'ex/s':>10}{'epoch s':>9}"
        f"{'efficiency':>11}{'vs 1 proc':>10}"
    )
    for r in rows:
        eff, vs = r.get("efficiency"), r.get("vs_one_process")
        print(
            f"{r['mode']:<8}{r['processes']:>4}x{r['devices_per_process']:<2}{r['batchsize']:>6}"
            f"{r['per_device_batch']:>6}{r['examples_per_s']:>10,.0f}{r['epoch_time']:>9.2f}"
            f"{'' if eff is None else f'{eff:.2f}':>11}{'' if vs is None else f'{vs:.2f}':>10}"
        )
    if not FLAGS.png:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for mode in ("strong", "weak"):
        sel = [r for r in rows if r["mode"] == mode and "efficiency" in r]
        ax.plot(
            [r["devices"] for r in sel],
            [r["efficiency"] for r in sel],
            marker="o",
            label=f"{mode} (B={FLAGS.batchsize})"
            if mode == "strong"
            else f"{mode} ({FLAGS.per_device_batch}/device)",
        )
    ns = sorted({r["devices"] for r in rows if r["mode"] != "layout"})
    ax.plot(ns, [1 / n for n in ns], "k:", label="1/n: shared cores, no overhead")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("efficiency: rate / (n x rate on 1 device)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    sel = [r for r in rows if r["mode"] == "layout"]
    bx.bar(
        [f"{r['processes']}x{r['devices_per_process']}" for r in sel],
        [r["examples_per_s"] for r in sel],
    )
    bx.set_xlabel("processes x devices")
    bx.set_ylabel(f"examples/s (B={FLAGS.batchsize})")
    fig.suptitle(f"{FLAGS.network} {FLAGS.update_rule}: the training loop over simulated devices")
    fig.tight_layout()
    with files.atomic_open(FLAGS.png, "wb") as f:
        fig.savefig(f, format="png")
    print(f"chart: {FLAGS.png}")


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.quick:
        FLAGS.devices, FLAGS.layouts, FLAGS.batchsize, FLAGS.per_device_batch = (
            ["1", "2"],
            ["1x2", "2x1"],
            400,
            400,
        )
    rows = measure()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    files.append_jsonl(FLAGS.out, rows)
    report(rows)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("benchmarks/device_scaling.py"))
