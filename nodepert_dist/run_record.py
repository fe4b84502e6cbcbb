"""Reading a run's record in its workdir (metrics.jsonl, config.json): what the training loop
wrote (metrics.py) and what the sweep launcher reads to tell finished runs. Standard library only.
"""

from __future__ import annotations

import os

from nodepert_dist import files

METRICS = "metrics.jsonl"
HISTORY = (METRICS, "metrics.csv", "config.json")  # one run's record in its workdir
# What may vary within a --population (population.py); its rows carry "member" and these.
MEMBER_SETTINGS = ("lr", "sigma", "seed", "wd")


def read_metrics(workdir: str) -> list[dict]:
    """A run's metrics.jsonl rows, event rows included ([] before its first row; a torn last
    line, from a run killed mid-write, left out)."""
    return files.read_jsonl(os.path.join(workdir, METRICS))


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The per-epoch rows of a metrics.jsonl, without event rows (the crash guard's). A file where
    the epochs start over (two runs appended, as versions before the fresh-start rule wrote:
    epochs 0, 1, 0, 1, 2) reads as its last run."""
    rows = [r for r in rows if "event" not in r]
    order = [(r["epoch"], r.get("member", 0)) for r in rows]  # a population: N rows per epoch
    restarts = [i for i in range(1, len(rows)) if order[i] <= order[i - 1]]
    return rows[restarts[-1] :] if restarts else rows


def by_member(rows: list[dict]) -> dict[int, list[dict]]:
    """{member index: its rows}, in order ({0: rows} for a solo run's)."""
    members: dict[int, list[dict]] = {}
    for r in rows:
        members.setdefault(r.get("member", 0), []).append(r)
    return members


def member_label(row: dict) -> str:
    """ "member 2: lr=0.02, seed=0" for a population row, "" for a solo run's."""
    if "member" not in row:
        return ""
    values = ", ".join(f"{k}={row[k]:g}" for k in MEMBER_SETTINGS if k in row)
    return f"member {row['member']}: {values}"


def csv_columns(columns: tuple, row: dict) -> tuple:
    """A metrics.csv's columns: `columns`, with a population's member index and settings
    after the first (the epoch)."""
    if "member" not in row:
        return columns
    return (columns[0], "member", *[k for k in MEMBER_SETTINGS if k in row], *columns[1:])
