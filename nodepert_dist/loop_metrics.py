"""The train loop's metrics on the host: the device's step log (loop_step.py) read every
`--metrics_every` steps, and always before a checkpoint, at a stop and at the epoch's end.

Each read adds the unread steps' rows into the epoch's float64 sums in step order, as the loop
did when it read every step, so the sums (and the epoch rows) are the same for any
--metrics_every. What a late read changes, and why it is safe:
- A non-finite loss stops the run (crash_guard.Diverged, naming the exact step) at the read
  after it, up to --metrics_every steps later. The steps in between are wasted work, never
  saved: every checkpoint is preceded by a read, so a state after a non-finite step is never
  written (and the checkpointer refuses a non-finite state anyway).
- A population's members are frozen by the step itself, on the device, the step they turn
  non-finite (step.py); the host's `population.Watch` writes their `member_diverged` events
  with that step and loss at the next read, and stops the run there if every member has
  diverged (its state is every member's last finite one).
- The progress line's loss is the last read step's.
"""

from __future__ import annotations

import numpy as np

from nodepert_dist import crash_guard
from nodepert_dist import mesh as mesh_lib


class Reader:
    """When to read the log (`due`) and the reading (`read`), from step `through` on."""

    def __init__(self, every: int, step: int, watch=None, dog=None):
        # dog: hang_watchdog.StepWatchdog, told of each step the host sees finished
        self.every, self.through, self.watch, self.dog = every, step, watch, dog

    def due(self, step: int) -> bool:
        return step - self.through >= self.every

    def read(self, sums: dict, log, step: int, epoch: int) -> None:
        """Adds steps through+1..step of the device `log` into `sums`; waits for step `step`."""
        if step == self.through:
            return
        values = mesh_lib.to_host(log)
        at = np.arange(self.through, step) % len(values["count"])  # update s is row s-1 % rows
        rows = {k: np.asarray(v, np.float64)[at] for k, v in values.items()}
        add(sums, rows, self.through + 1, epoch, self.watch)
        self.through = step
        if self.dog is not None:
            self.dog.beat(step)


def add(sums: dict, rows: dict, first_step: int, epoch: int, watch=None) -> None:
    """Adds consecutive steps' metrics (`rows`: arrays over steps, then members) into the
    epoch's float64 `sums`, in step order; raises crash_guard.Diverged at the first
    non-finite loss. A population's frozen members (`watch`: population.Watch) add nothing;
    the run stops when all have diverged."""
    loss, correct = rows["loss_sum"], rows["correct"]
    if watch is not None:
        alive_before = watch.alive.copy()
        for j in range(len(loss)):  # events (and the all-diverged stop) at their own step
            watch.after_step(rows["alive"][j] > 0, loss[j], first_step + j, epoch)
        keep = alive_before & (rows["alive"] > 0)  # the step's marks are final once False
        loss, correct = np.where(keep, loss, 0.0), np.where(keep, correct, 0.0)
    bad = np.argwhere(~np.isfinite(loss))
    if bad.size:
        j = bad[0]
        who = f" of population member {j[1]}" if loss.ndim > 1 else ""
        raise crash_guard.Diverged(
            f"the training loss{who} is {loss[tuple(j)]} at step {first_step + j[0]} (epoch "
            f"{epoch}): training diverged; use a lower --lr (with --decorrelate, or "
            f"--decorrelate_lr)"
        )

    def running(total, values):  # ((total + v0) + v1) + ...: the order of one read per step
        start = np.broadcast_to(np.asarray(total, np.float64), values.shape[1:])
        return np.cumsum(np.concatenate([start[None], values]), 0)[-1]

    sums["loss_sum"] = running(sums["loss_sum"], loss)
    sums["correct"] = running(sums["correct"], correct)
    sums["last_loss"] = loss[-1] / rows["count"][-1]
