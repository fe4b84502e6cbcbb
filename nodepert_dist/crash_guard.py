"""The crash guard (`nodepert-train --crash_guard`): roll back and lower the lr on a crash.

A crash is test accuracy more than `--crash_points` percentage points below the best so far
(the original research code's definition), or a non-finite training loss. The guard wraps
`train.run`. A hook raises at the epoch row that crashed, before that epoch's checkpoint is
saved; a non-finite loss already stops the run before its step is saved. Then the guard:
  1. moves the checkpoints newer than the last good epoch row to `<workdir>/rolled_back/<n>/`
     (kept for inspection, e.g. the crash replay of `experiments crash-timing`);
  2. appends a `{"event": "rollback", ...}` row to metrics.jsonl and multiplies the lr by
     `--crash_lr_factor`;
  3. runs again, which resumes from the newest remaining checkpoint (or from scratch if none).
After `--crash_max_rollbacks` rollbacks it gives up with a one-line error. Its state (lr,
rollbacks) is kept in `<workdir>/crash_guard.json`, so a preempted guarded run resumes with the
lowered lr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from nodepert_dist import checkpoint, metrics

STATE_FILE = "crash_guard.json"


class Crashed(Exception):
    """Raised by the detector hook at the first crashed epoch row."""

    def __init__(self, row: dict, best: float):
        super().__init__(f"test accuracy fell from {100 * best:.1f}% to "
                         f"{100 * row['test_acc']:.1f}% at epoch {row['epoch']}")
        self.row, self.best = row, best


class Diverged(ValueError):
    """A non-finite training loss (train.py raises it; the CLI prints it as one line)."""


class GaveUp(ValueError):
    """The guard's last word: a ValueError, so the CLI prints it as one line."""


def is_crash(acc: float, best: float, points: float) -> bool:
    """A non-finite accuracy, or one more than `points` percentage points below `best`."""
    return not math.isfinite(acc) or 100.0 * (best - acc) > points


def first_crash(rows: list[dict], points: float) -> Optional[dict]:
    """The first epoch row whose test accuracy crashed below the best of the rows before it."""
    best = -math.inf
    for row in metrics.epoch_rows(rows):
        if best > -math.inf and is_crash(row["test_acc"], best, points):
            return row
        best = max(best, row["test_acc"])
    return None


class Detector:
    """Hook: raises Crashed at the first epoch row that crashes."""

    def __init__(self, points: float):
        self.points = points

    def after_row(self, row: dict, rows: list[dict]) -> None:
        earlier = [r["test_acc"] for r in rows[:-1]]
        if earlier and is_crash(row["test_acc"], max(earlier), self.points):
            raise Crashed(row, max(earlier))


def _read_state(workdir: str, cfg) -> dict:
    path = os.path.join(workdir, STATE_FILE)
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("base_lr") == cfg.lr:  # the same run; a new --lr starts over
            return state
    return {"base_lr": cfg.lr, "lr": cfg.lr, "rollbacks": 0}


def _write_state(workdir: str, state: dict) -> None:
    if not metrics.is_writer():
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f".{STATE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(workdir, STATE_FILE))


def _roll_back(workdir: str, good_step: int, n: int) -> int:
    """Moves checkpoints past `good_step` aside; returns the step training resumes from."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = checkpoint.committed_steps(ckpt_dir)
    if metrics.is_writer():
        aside = os.path.join(workdir, "rolled_back", str(n))
        for s in steps:
            if s > good_step:
                os.makedirs(aside, exist_ok=True)
                os.replace(checkpoint.step_dir(ckpt_dir, s),
                           os.path.join(aside, os.path.basename(checkpoint.step_dir(ckpt_dir, s))))
    kept = [s for s in steps if s <= good_step]
    if not kept:  # no checkpoint to resume: the run starts over and rewrites epoch 0
        metrics.truncate_after(workdir, -1)
    return kept[-1] if kept else 0


def run(train_run, cfg, hooks=()) -> tuple[list[dict], str]:
    """`train_run(cfg, hooks)` (train.run) under the guard, whatever `cfg.crash_guard` says."""
    state = _read_state(cfg.workdir, cfg)
    while True:
        current = dataclasses.replace(cfg, lr=state["lr"])
        try:
            return train_run(current, hooks=(*hooks, Detector(cfg.crash_points)))
        except (Crashed, Diverged) as e:
            reason = str(e)
            kind = "crash" if isinstance(e, Crashed) else "non_finite_loss"
        rows = metrics.epoch_rows(metrics.read_jsonl(cfg.workdir))
        if kind == "crash":  # the crashed row is the last one written
            rows = rows[:-1]
        good = rows[-1] if rows else {"epoch": 0, "step": 0}
        event = {"event": "rollback", "reason": kind, "detail": reason,
                 "rollback": state["rollbacks"] + 1, "lr": state["lr"],
                 "last_good_epoch": good["epoch"], "last_good_step": good["step"]}
        if state["rollbacks"] >= cfg.crash_max_rollbacks:
            metrics.write_event(cfg.workdir, {**event, "event": "gave_up"})
            raise GaveUp(f"crash guard gave up after {state['rollbacks']} rollback(s) (lr "
                         f"{state['base_lr']:g} -> {state['lr']:g}); the last: {reason}. "
                         f"Use a lower --lr or a larger --crash_max_rollbacks")
        event["resume_step"] = _roll_back(cfg.workdir, good["step"], state["rollbacks"] + 1)
        state = {**state, "rollbacks": state["rollbacks"] + 1,
                 "lr": state["lr"] * cfg.crash_lr_factor}
        event["new_lr"] = state["lr"]
        metrics.write_event(cfg.workdir, event)
        _write_state(cfg.workdir, state)
