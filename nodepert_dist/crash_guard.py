"""The crash guard (`nodepert-train --crash_guard`): roll back and lower the lr on a crash.

A crash is test accuracy more than `--crash_points` percentage points below the best so far
(the original research code's definition), or a non-finite training loss. The guard wraps
`train.run`. A hook raises at the epoch row that crashed, before that epoch's checkpoint is
saved; a non-finite loss already stops the run before its step is saved. Then the guard:
  1. moves the checkpoints newer than the last good epoch row to `<workdir>/rolled_back/<n>/`
     (kept for inspection, e.g. the crash replay of `experiments crash-timing`), with the
     epoch rows they replace (`metrics.jsonl` there);
  2. appends a `{"event": "rollback", ...}` row to metrics.jsonl and multiplies the lr by
     `--crash_lr_factor`;
  3. runs again, which resumes from the newest remaining checkpoint (from scratch only after a
     crash in epoch 1).
The rollback target, the newest checkpoint at or before the last good epoch row, is never pruned
(`Checkpointer.rollback_step`), whatever `--keep_checkpoints` says; if it is missing anyway the
guard gives up with one line rather than start over. After `--crash_max_rollbacks` rollbacks it
gives up with a one-line error. A non-finite train state refused by a checkpoint save is a crash
too. The guard holds the workdir lock and the preemption watcher across its attempts. Its state
(lr, rollbacks) is kept in `<workdir>/crash_guard.json`, so a preempted guarded run resumes with
the lowered lr.
"""

from __future__ import annotations

import dataclasses
import math
import os

from nodepert_dist import (
    agree,
    checkpoint_layout,
    files,
    metrics,
    preempt,
    run_record,
    workdir_lock,
)
from nodepert_dist.settings import setting

STATE_FILE = "crash_guard.json"


@dataclasses.dataclass(frozen=True)
class CrashGuardSettings:
    """--crash_guard and its criterion and limits; part of config.Config."""

    crash_guard: bool = setting(
        False,
        "On a non-finite loss or a crash (test accuracy "
        "--crash_points below the best so far), roll back to the last "
        "good checkpoint and multiply the lr by --crash_lr_factor; "
        "events go to metrics.jsonl. In a --population a crashed member is frozen instead "
        "(no rollback) while the others go on.",
        group="training",
    )
    crash_points: float = setting(
        25.0,
        "A crash: test accuracy this many percentage points below the best so far.",
        group="training",
    )
    crash_lr_factor: float = setting(
        0.5, "The crash guard multiplies the lr by this at each rollback.", group="training"
    )
    crash_max_rollbacks: int = setting(
        3, "The crash guard gives up after this many rollbacks.", group="training"
    )

    def validate(self) -> None:
        if not (
            self.crash_points > 0 and 0 < self.crash_lr_factor < 1 and self.crash_max_rollbacks >= 0
        ):
            raise ValueError(
                "--crash_points must be > 0, --crash_lr_factor in (0, 1) and "
                "--crash_max_rollbacks >= 0"
            )


class Crashed(Exception):
    """Raised by the detector hook at the first crashed epoch row."""

    def __init__(self, row: dict, best: float):
        super().__init__(
            f"test accuracy fell from {100 * best:.1f}% to "
            f"{100 * row['test_acc']:.1f}% at epoch {row['epoch']}"
        )
        self.row, self.best = row, best


class Diverged(ValueError):
    """A non-finite training loss (train.py raises it; the CLI prints it as one line). A
    non-finite train state is `checkpoint_layout.NonFiniteState`, raised by the checkpoint save."""


class GaveUp(ValueError):
    """The guard's last word: a ValueError, so the CLI prints it as one line."""


def is_crash(acc: float, best: float, points: float) -> bool:
    """A non-finite accuracy, or one more than `points` percentage points below `best`."""
    return not math.isfinite(acc) or 100.0 * (best - acc) > points


def first_crash(rows: list[dict], points: float) -> dict | None:
    """The first epoch row whose test accuracy crashed below the best of the rows before it."""
    best = -math.inf
    for row in run_record.epoch_rows(rows):
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
        state = files.read_json(path)
        if state.get("base_lr") == cfg.lr:  # the same run; a new --lr starts over
            return state
    return {"base_lr": cfg.lr, "lr": cfg.lr, "rollbacks": 0}


def _write_state(workdir: str, state: dict) -> None:
    if not metrics.is_writer():
        return
    files.write_json(os.path.join(workdir, STATE_FILE), state)


def _aside_dir(workdir: str, n: int) -> str:
    """`<workdir>/rolled_back/<n>`, or the next free number (an earlier guard's may be there)."""
    while os.path.exists(os.path.join(workdir, "rolled_back", str(n))):
        n += 1
    return os.path.join(workdir, "rolled_back", str(n))


def _roll_back(workdir: str, good: dict, n: int) -> int:
    """Moves the checkpoints and epoch rows past the epoch row `good` to
    `<workdir>/rolled_back/<n>/`; returns the step training resumes from."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = checkpoint_layout.committed_steps(ckpt_dir)
    kept = [s for s in steps if s <= good["step"]]
    # Process 0's listing decides (like restore's): a stale cache must not split the processes.
    if not agree.from_process_0(len(kept)) and good["step"] > 0:
        raise GaveUp(
            f"crash guard: no checkpoint at or before the last good epoch {good['epoch']} "
            f"(step {good['step']}) is left in {ckpt_dir} to roll back to; rerun with "
            f"a lower --lr"
        )
    if metrics.is_writer():
        aside = _aside_dir(workdir, n)
        os.makedirs(aside)
        later = [
            r
            for r in run_record.epoch_rows(run_record.read_metrics(workdir))
            if r["epoch"] > good["epoch"]
        ]
        files.write_jsonl(os.path.join(aside, "metrics.jsonl"), later)  # the rows it replaces
        for s in steps:
            if s > good["step"]:
                name = os.path.basename(checkpoint_layout.step_dir(ckpt_dir, s))
                os.replace(os.path.join(ckpt_dir, name), os.path.join(aside, name))
    if not kept:  # a crash in epoch 1: start over from the seed's init, which rewrites epoch 0
        metrics.truncate_after(workdir, -1)
    return kept[-1] if kept else 0


def run(train_run, cfg, hooks=()) -> tuple[list[dict], str]:
    """`train_run(cfg, hooks)` (train.run) under the guard, whatever `cfg.crash_guard` says.

    It holds the workdir lock and the preemption watcher across attempts: no other run can
    start in the workdir while checkpoints are moved, and a signal during a rollback stops
    the run (exit 75) with the rollback done."""
    cfg.validate()  # bad input is one line before the workdir is touched
    if cfg.population:  # each member is guarded in the loop (population.Watch): no rollbacks
        return train_run(dataclasses.replace(cfg, crash_guard=True), hooks)
    if not cfg.checkpointing and cfg.crash_max_rollbacks > 0:
        raise ValueError(
            "--crash_guard rolls back to checkpoints: set --checkpoint_every_epochs "
            "or --checkpoint_every_steps"
        )
    with preempt.Watcher(cfg.preemption_check_steps) as watcher, workdir_lock.hold(cfg.workdir):
        return _guarded(train_run, cfg, hooks, watcher)


def _guarded(train_run, cfg, hooks, watcher) -> tuple[list[dict], str]:
    state = _read_state(cfg.workdir, cfg)
    while True:
        current = dataclasses.replace(cfg, lr=state["lr"])
        try:
            return train_run(current, hooks=(*hooks, Detector(cfg.crash_points)))
        except (Crashed, Diverged, checkpoint_layout.NonFiniteState) as e:
            reason = str(e)
            kind = (
                "crash"
                if isinstance(e, Crashed)
                else "non_finite_loss"
                if isinstance(e, Diverged)
                else "non_finite_state"
            )
        rows = run_record.epoch_rows(run_record.read_metrics(cfg.workdir))
        if kind == "crash":  # the crashed row is the last one written
            rows = rows[:-1]
        good = rows[-1] if rows else {"epoch": 0, "step": 0}
        event = {
            "event": "rollback",
            "reason": kind,
            "detail": reason,
            "rollback": state["rollbacks"] + 1,
            "lr": state["lr"],
            "last_good_epoch": good["epoch"],
            "last_good_step": good["step"],
        }
        if state["rollbacks"] >= cfg.crash_max_rollbacks:
            metrics.write_event(cfg.workdir, {**event, "event": "gave_up"})
            raise GaveUp(
                f"crash guard gave up after {state['rollbacks']} rollback(s) (lr "
                f"{state['base_lr']:g} -> {state['lr']:g}); the last: {reason}. "
                f"Use a lower --lr or a larger --crash_max_rollbacks"
            )
        try:
            event["resume_step"] = _roll_back(cfg.workdir, good, state["rollbacks"] + 1)
        except GaveUp as e:
            metrics.write_event(cfg.workdir, {**event, "event": "gave_up", "detail": str(e)})
            raise
        state = {
            **state,
            "rollbacks": state["rollbacks"] + 1,
            "lr": state["lr"] * cfg.crash_lr_factor,
        }
        event["new_lr"] = state["lr"]
        metrics.write_event(cfg.workdir, event)
        _write_state(cfg.workdir, state)
        if watcher.signalled():  # every process together (each raised the same crash)
            raise preempt.Preempted(
                f"preempted by {watcher.describe()} during a crash-guard rollback: rolled back "
                f"to step {event['resume_step']} (lr {state['lr']:g}); run the same command "
                f"again to resume (exit {preempt.EXIT_CODE})"
            )
