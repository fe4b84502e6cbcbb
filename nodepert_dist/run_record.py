"""Reading a run's record in its workdir (metrics.jsonl, config.json): what the training loop
wrote (metrics.py) and what the sweep launcher reads to tell finished runs. Standard library only.
"""

from __future__ import annotations

import os

from nodepert_dist import files

METRICS = "metrics.jsonl"
HISTORY = (METRICS, "metrics.csv", "config.json")  # one run's record in its workdir


def read_metrics(workdir: str) -> list[dict]:
    """A run's metrics.jsonl rows, event rows included ([] before its first row; a torn last
    line, from a run killed mid-write, left out)."""
    return files.read_jsonl(os.path.join(workdir, METRICS))


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The per-epoch rows of a metrics.jsonl, without event rows (the crash guard's). A file where
    the epochs start over (two runs appended, as versions before the fresh-start rule wrote:
    epochs 0, 1, 0, 1, 2) reads as its last run."""
    rows = [r for r in rows if "event" not in r]
    restarts = [i for i in range(1, len(rows)) if rows[i]["epoch"] <= rows[i - 1]["epoch"]]
    return rows[restarts[-1] :] if restarts else rows
