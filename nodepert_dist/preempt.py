"""Preemption: on SIGTERM or SIGUSR1 every process stops at the same step, checkpoints, exits 75.

A signal handler only records the signal. At step boundaries (every `check_every` steps, the
same global steps on every process) the train loop asks `Watcher.stop_now(step)`: with several
processes that is one small all-gather of "did I get a signal?", so a signal delivered to any
one process (or to each at a slightly different time) stops all of them after the same step.
The loop then saves a checkpoint, waits for it to commit, and `main` exits with EXIT_CODE;
`launch/slurm/*.sbatch` requeue the job on it and the restarted run resumes exactly.

Why not jax's preemption sync manager (`multihost_utils.reached_preemption_sync_point`): it
exists only under jax.distributed (not for one process), and listens to SIGTERM only; SLURM's
advance warning (`--signal=USR1@120`) is SIGUSR1.

Test hook: NODEPERT_TEST_SIGNAL_AT_STEP="STEP[@PROCESS]" makes the process (only PROCESS, if
given) send itself SIGTERM right after it dispatched step STEP. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

from nodepert_dist import agree

MULTIPROCESS_CHECK_STEPS = 20
EXIT_CODE = 75  # EX_TEMPFAIL ("try again later"): preempted, checkpoint saved, rerun to resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TEST_SIGNAL_ENV = "NODEPERT_TEST_SIGNAL_AT_STEP"


class Preempted(Exception):
    """The run stopped on a signal after saving its position (message: one line)."""


class Watcher:
    """Context manager: records SIGTERM/SIGUSR1 while the run lives (main thread only).

    Nested in a live one (the crash guard's, held across its attempts and rollbacks), it is that
    one: a signal that arrives between two attempts is not forgotten."""

    _active: Watcher | None = None

    def __init__(self, check_every: int = 0):
        # 0: every step with one process (no collective: free); with several, the agreement is
        # a collective the host waits for, so only every MULTIPROCESS_CHECK_STEPS steps
        # (checking each step kept a GPU's queue empty; SLURM warns 120 s ahead).
        self.check_every = check_every or (
            1 if jax.process_count() == 1 else MULTIPROCESS_CHECK_STEPS
        )
        self.signal: int | None = None
        self._told = False
        self._previous: dict = {}
        self._outer: Watcher | None = None
        self._test_step, self._test_process = _test_hook()

    def __enter__(self) -> Watcher:
        if Watcher._active is not None:
            self._outer = Watcher._active
            return self._outer
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        Watcher._active = self
        return self

    def __exit__(self, *exc) -> None:
        if self._outer is not None:
            self._outer = None
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        Watcher._active = None

    def _record(self, signum, _frame) -> None:
        # No I/O here: the handler runs in the main thread wherever it is, possibly inside a
        # write to the same stream (a reentrant write raises); the loop logs it (_tell).
        if self.signal is None:
            self.signal = signum

    def _tell(self) -> None:
        if self.signal is not None and not self._told:
            self._told = True
            logging.warning(
                "got %s: stopping at the next step boundary to checkpoint", self.describe()
            )

    def stop_now(self, step: int, since: int | None = None) -> bool:
        """Called by every process after every call of the step (which ran steps since+1..step;
        since: step - 1 if not given); True on all of them, or on none."""
        since = step - 1 if since is None else since
        self._tell()
        if since < (self._test_step or 0) <= step and self._test_process in (
            None,
            jax.process_index(),
        ):
            os.kill(os.getpid(), signal.SIGTERM)
        if step // self.check_every == since // self.check_every:  # no multiple of N passed
            return False
        # A collective (with several processes): every process calls it at the same steps.
        return agree.anywhere(self.signal is not None)

    def signalled(self) -> bool:
        """Whether any process got a signal (a collective: every process calls it together)."""
        self._tell()
        return agree.anywhere(self.signal is not None)

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal to another process"


def _test_hook() -> tuple[int | None, int | None]:
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None, None
    step, _, process = value.partition("@")
    return int(step), (int(process) if process else None)
