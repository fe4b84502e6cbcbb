"""Run outputs: config.json, metrics.jsonl and metrics.csv in the workdir, and progress lines.

Only process 0 writes or prints (every process computes the same global metrics). Rows are
appended and flushed one epoch at a time, so a killed run leaves every finished epoch on disk.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import logging

from nodepert_dist import files
from nodepert_dist.run_record import HISTORY, csv_columns, epoch_rows, member_label, read_metrics

CSV_COLUMNS = (
    "epoch",
    "step",
    "epoch_time",
    "train_acc",
    "test_acc",
    "train_loss",
    "test_loss",
    "mean_step_loss",
    "examples_per_s",
)


def is_writer() -> bool:
    return jax.process_index() == 0


EARLIER = "earlier_runs"


class MetricsWriter:
    """Appends one row per epoch to metrics.jsonl and metrics.csv.

    `fresh`: the run starts at epoch 0 (no checkpoint to resume). An earlier run's epoch rows
    in the workdir are then moved aside first (`set_aside_history`), never appended to."""

    def __init__(self, workdir: str, config: dict, fresh: bool = False):
        self.workdir = workdir
        if not is_writer():
            return
        os.makedirs(workdir, exist_ok=True)
        if fresh:
            set_aside_history(workdir)
        files.write_json(os.path.join(workdir, "config.json"), config, indent=2)

    def truncate_after(self, epoch: int) -> None:
        """Drops rows past `epoch` (a resumed run rewrites the epochs it repeats)."""
        truncate_after(self.workdir, epoch)

    def write(self, row: dict) -> dict:
        """Appends `row` (non-finite values as null) and returns what was written."""
        row = files.finite(row)  # NaN/Inf as None (null), as files writes them
        if not is_writer():
            return row
        files.append_jsonl(os.path.join(self.workdir, "metrics.jsonl"), [row])
        files.append_csv(
            os.path.join(self.workdir, "metrics.csv"), [row], csv_columns(CSV_COLUMNS, row)
        )
        logging.info(
            "epoch %d%s: %s",
            row["epoch"],
            f" ({member_label(row)})" if "member" in row else "",
            "  ".join(f"{k}={_fmt(row.get(k))}" for k in CSV_COLUMNS[1:] if row.get(k) is not None),
        )
        return row


def set_aside_history(workdir: str) -> str:
    """Moves an earlier run's metrics.jsonl, metrics.csv and config.json to
    `<workdir>/earlier_runs/<n>/` (the next free n) if metrics.jsonl or metrics.csv holds an
    epoch row; returns that folder ("" if nothing was moved). Event rows alone (a crash guard
    starting over from epoch 0) are this run's history and stay."""
    csv_path = os.path.join(workdir, "metrics.csv")
    csv_rows = files.read_csv(csv_path) if os.path.exists(csv_path) else []
    if not epoch_rows(read_metrics(workdir)) and not csv_rows:
        return ""
    n = 1
    while os.path.exists(os.path.join(workdir, EARLIER, str(n))):
        n += 1
    aside = os.path.join(workdir, EARLIER, str(n))
    os.makedirs(aside)
    moved = [name for name in HISTORY if os.path.exists(os.path.join(workdir, name))]
    for name in moved:
        os.replace(os.path.join(workdir, name), os.path.join(aside, name))
    logging.warning(
        "fresh start (no checkpoint to resume) in %s, which holds an earlier run's "
        "metrics: moved %s to %s (kept; this run writes its own)",
        workdir,
        ", ".join(moved),
        aside,
    )
    return aside


def truncate_after(workdir: str, epoch: int) -> None:
    """Drops epoch rows past `epoch`; event rows (crash guard) stay: they are history."""
    if not is_writer():
        return
    rows = [r for r in read_metrics(workdir) if "event" in r or r["epoch"] <= epoch]
    files.write_jsonl(os.path.join(workdir, "metrics.jsonl"), rows)
    kept = epoch_rows(rows)
    columns = csv_columns(CSV_COLUMNS, kept[0]) if kept else CSV_COLUMNS
    files.write_csv(os.path.join(workdir, "metrics.csv"), kept, columns)


def write_event(workdir: str, event: dict) -> None:
    """Appends an event row ({"event": ..., ...}) to metrics.jsonl only (not an epoch row)."""
    if not is_writer():
        return
    os.makedirs(workdir, exist_ok=True)
    files.append_jsonl(os.path.join(workdir, "metrics.jsonl"), [event])
    logging.warning("%s", files.json_text(event, indent=None))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """A progress line during an epoch: in place on a terminal (~10 times a second), otherwise
    one log line at the end of the epoch (logs and SLURM output files stay short)."""

    def __init__(self, epoch: int, total_steps: int, global_batch: int):
        self.epoch, self.total, self.batch = epoch, total_steps, global_batch
        self.start = self.shown = time.perf_counter()
        self.tty = is_writer() and sys.stderr.isatty()

    def update(self, done: int, loss=None) -> None:
        """`loss` is a callable, called only when a line is printed (it syncs with the device)."""
        if not is_writer() or not (
            done == self.total or (self.tty and time.perf_counter() - self.shown > 0.1)
        ):
            return
        self.shown = time.perf_counter()
        elapsed = time.perf_counter() - self.start
        rate = done * self.batch / max(elapsed, 1e-9)
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        text = f"epoch {self.epoch} [{bar}] {done}/{self.total} steps  {rate:,.0f} ex/s" + (
            f"  loss {loss():.4g}" if loss is not None else ""
        )
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if done == self.total else ""))
            sys.stderr.flush()
        else:
            logging.info(text)
