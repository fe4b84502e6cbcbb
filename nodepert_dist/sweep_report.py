"""A sweep's results: one CSV row per finished run (`summary`) and a markdown table with the
seeds pooled (`table`). Standard library only."""

from __future__ import annotations

import shlex

from nodepert_dist import files, run_record, sweep

SUMMARY_METRICS = (
    "epoch",
    "step",
    "test_acc",
    "test_loss",
    "train_acc",
    "train_loss",
    "mean_step_loss",
    "examples_per_s",
)


def summary(runs: list[dict], out_path: str) -> tuple[int, int]:
    """Writes one CSV row per finished run (settings + final metrics); returns (written, skipped)."""
    setting_cols = list(runs[0]["settings"]) if runs else []
    rows = []
    for run in runs:
        row = sweep.final_row(run)
        if row is not None:
            rows.append(
                {"index": run["index"], **run["settings"], **row, "workdir": run["workdir"]}
            )
    files.write_csv(out_path, rows, ["index"] + setting_cols + list(SUMMARY_METRICS) + ["workdir"])
    return len(rows), len(runs) - len(rows)


def table(runs: list[dict], thresholds=(0.90, 0.93, 0.95)) -> str:
    """Markdown, one row per setting with its seeds pooled: epochs, final and best test accuracy
    (mean and half the min-max range over seeds), training seconds to reach each threshold (the
    summed epoch_time up to the first epoch at or above it, mean over seeds; '-' unless every
    seed reached it; epoch resolution) with the epochs that took in brackets (seconds depend on
    the machine's load, epochs do not), examples/s (median of all epochs), the command."""
    groups: dict = {}
    for run in runs:
        key = tuple((k, v) for k, v in run["settings"].items() if k != "seed")
        groups.setdefault(key, []).append(run)
    pct = lambda vs: f"{100 * sum(vs) / len(vs):.1f} ± {50 * (max(vs) - min(vs)):.1f}"
    head = ["setting", "epochs", "final test %", "best test %"]
    head += [f"s to {100 * t:g}%" for t in thresholds] + ["examples/s", "seeds", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in groups.items():
        metric_rows = [
            run_record.epoch_rows(sweep.run_rows(r)) for r in members if sweep.final_row(r)
        ]
        if not metric_rows:
            continue
        # epoch rows only (event rows such as the crash guard's rollbacks have no accuracy);
        # epoch 0 is the untrained net; a non-finite accuracy is written as null
        epochs = [
            [
                r
                for r in m
                if isinstance(r.get("epoch"), int)
                and "event" not in r
                and r["epoch"] > 0
                and isinstance(r.get("test_acc"), (int, float))
            ]
            for m in metric_rows
        ]
        if not all(epochs):
            continue
        cells = [
            ",".join(f"{k}={sweep.fmt(v)}" for k, v in key) or "-",
            str(len(epochs[0])),
            pct([e[-1]["test_acc"] for e in epochs]),
            pct([max(r["test_acc"] for r in e) for e in epochs]),
        ]
        for t in thresholds:
            times, counts = [], []
            for e in epochs:
                first = next((i for i, r in enumerate(e) if r["test_acc"] >= t), None)
                counts.append(first if first is None else first + 1)
                times.append(
                    first if first is None else sum(r["epoch_time"] for r in e[: first + 1])
                )
            cells.append(
                "-"
                if None in times
                else f"{sum(times) / len(times):.0f} ({sum(counts) / len(counts):g})"
            )
        speeds = sorted(r["examples_per_s"] for e in epochs for r in e)
        cells += [f"{speeds[len(speeds) // 2]:,.0f}", str(len(epochs))]
        flags = {k: v for k, v in members[0]["flags"].items() if k not in ("workdir", "seed")}
        argv = members[0]["argv"]
        command = argv[: len(argv) - len(members[0]["flags"])]
        command += [sweep.flag_arg(k, v) for k, v in flags.items()]
        cells.append(f"`{shlex.join(command)} --seed=S`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
