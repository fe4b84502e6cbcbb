"""Faults injected into checkpointing, for tests only: a stalled or failing writer, a stale
listing. Off unless a test turns them on; production code only calls the hooks below, which do
nothing then (no environment variable is read on the save or restore path).

A test turns them on in its own process with `inject(Faults(...))` (a context manager), or in
a subprocess it starts by running it through `enable_from_env()` with these variables set:

    NODEPERT_CKPT_TEST_WRITE_DELAY_S="SECONDS[@FROM_STEP]"  the background writer sleeps SECONDS
        after writing its first array (saves at step >= FROM_STEP): a process can be killed
        while a save is in flight
    NODEPERT_CKPT_TEST_FAIL="PROCESS@FROM_STEP[:ERRNO_NAME]"  that process's writer raises
        OSError (default EIO; e.g. ENOSPC for a full disk) for saves at step >= FROM_STEP
    NODEPERT_CKPT_TEST_HIDE_NEWEST="PROCESS"  that process's listing misses the newest
        committed step (a stale file-system cache)

`run_module_with_faults` is the subprocess entry: `python -c` of
`from nodepert_dist.checkpoint_faults import run_module_with_faults as r; r("nodepert_dist.train")`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time

DELAY_ENV = "NODEPERT_CKPT_TEST_WRITE_DELAY_S"
FAIL_ENV = "NODEPERT_CKPT_TEST_FAIL"
HIDE_ENV = "NODEPERT_CKPT_TEST_HIDE_NEWEST"


@dataclasses.dataclass(frozen=True)
class Faults:
    delay_s: float = 0.0
    delay_from_step: int = 0
    fail_process: int | None = None
    fail_from_step: int = 0
    fail_errno: str = "EIO"
    hide_newest_on: int | None = None


_active: Faults | None = None  # None: no faults (production)


def _process() -> int:
    import jax  # only when faults are on: this module stays importable without jax

    return jax.process_index()


# ----------------------------------------------------------------------------- hooks


def after_first_array(step: int) -> None:
    """Called by the writer once its first array is written."""
    if _active is not None and _active.delay_s and step >= _active.delay_from_step:
        time.sleep(_active.delay_s)


def before_marker(step: int, process: int) -> None:
    """Called by the writer before its done marker."""
    if _active is not None and _active.fail_process == process and step >= _active.fail_from_step:
        code = getattr(errno, _active.fail_errno)
        raise OSError(code, os.strerror(code) + " (injected by " + FAIL_ENV + ")")


def listing(steps: list[int]) -> list[int]:
    """The committed steps as this process's listing shows them."""
    if _active is not None and _active.hide_newest_on == _process():
        return steps[:-1]
    return steps


# ----------------------------------------------------------------------------- turning them on


@contextlib.contextmanager
def inject(faults: Faults):
    global _active
    before, _active = _active, faults
    try:
        yield
    finally:
        _active = before


def from_env(environ=os.environ) -> Faults | None:
    """The faults the NODEPERT_CKPT_TEST_* variables describe (None if none is set)."""
    fields = {}
    if environ.get(DELAY_ENV):
        seconds, _, from_step = environ[DELAY_ENV].partition("@")
        fields.update(delay_s=float(seconds), delay_from_step=int(from_step or 0))
    if environ.get(FAIL_ENV):
        who, _, rest = environ[FAIL_ENV].partition("@")
        from_step, _, name = rest.partition(":")
        fields.update(
            fail_process=int(who), fail_from_step=int(from_step or 0), fail_errno=name or "EIO"
        )
    if environ.get(HIDE_ENV):
        fields.update(hide_newest_on=int(environ[HIDE_ENV]))
    return Faults(**fields) if fields else None


def enable_from_env() -> None:
    """Turns on, for the rest of this process, the faults the environment describes."""
    global _active
    _active = from_env()


def run_module_with_faults(module: str) -> None:
    """Runs `python -m module` (with this process's arguments) with the environment's faults."""
    import runpy
    import sys

    enable_from_env()
    sys.argv[0] = module
    runpy.run_module(module, run_name="__main__", alter_sys=True)
