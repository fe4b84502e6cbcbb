"""A step-progress watchdog: a collective that hangs after start-up ends the process in one line.

NCCL (and gloo on CPU) wait forever inside a collective whose peer never arrives: a stuck GPU,
a broken link, a process stopped by the OS. XLA's GPU rendezvous timeouts (the SLURM templates
set them) cover a program's first collective, not one that hangs after it started, and
jax.distributed's heartbeat only notices a process that is gone. Without this the job holds its
nodes until the time limit. The loop calls `beat(step)` whenever the host sees a step finish
(a metrics fetch, a checkpoint, an evaluation); the first beat arms it, so compiling the first
step never counts. When no beat comes for `timeout_s` it writes one line naming the process and
the last step, then exits with HANG_EXIT_CODE (not the preemption's 75: a hang is a fault to
look at, and requeueing onto the same broken node would loop).
"""

from __future__ import annotations

import os
import sys
import threading
import time

HANG_EXIT_CODE = 4


class StepWatchdog:
    """`beat(step)` after each observed step; `close()` at the end. timeout_s <= 0: off."""

    def __init__(self, timeout_s: float, process: str, *, exit_fn=os._exit, clock=time.monotonic):
        self.timeout_s, self.process = float(timeout_s), process
        self._exit, self._clock = exit_fn, clock
        self._last: tuple[float, int] | None = None  # (time, step) of the last beat
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="hang-watchdog")
            self._thread.start()

    def beat(self, step: int) -> None:
        with self._lock:
            self._last = (self._clock(), int(step))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _watch(self) -> None:
        # Checks a few times per timeout: fires at most timeout_s / 4 late.
        while not self._stop.wait(min(self.timeout_s / 4, 30.0)):
            with self._lock:
                last = self._last
            if last is None or self._clock() - last[0] < self.timeout_s:
                continue
            sys.stderr.write(
                f"error: {self.process}: no training step finished in {self.timeout_s:g} s after "
                f"step {last[1]} (--hang_timeout_s); a collective is probably waiting for a "
                f"process or GPU that stopped answering (NCCL_DEBUG=INFO names the peer). The "
                f"last checkpoint is intact: rerun to resume (exit {HANG_EXIT_CODE})\n"
            )
            sys.stderr.flush()
            self._exit(HANG_EXIT_CODE)
            return
