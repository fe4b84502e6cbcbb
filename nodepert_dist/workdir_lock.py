"""One run per workdir: `<workdir>/.lock`, held by process 0 of the running job.

The lock is a JSON file {host, pid, token, started, slurm_job_id, slurm_restart_count} created
with O_EXCL (atomic on local and NFS v3+ file systems). While the run lives, a thread touches it
every HEARTBEAT_S seconds. A lock found at start-up is stale, and taken over with a warning, when
  - it names this host and a pid that is no longer alive (a crash or kill -9 here); or
  - it names this SLURM job with a lower SLURM_RESTART_COUNT (the job was requeued); or
  - it names another host and was not touched for STALE_S seconds (10 heartbeats missed).
Otherwise the run is refused with one line naming the owner: a second run would clobber the live
run's config, metrics and in-flight checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from typing import Optional

import jax
from absl import logging

from nodepert_dist import agree

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0


class WorkdirBusy(ValueError):
    """Another live run holds the workdir (one-line message)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
            "started": time.time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def stale_reason(holder: dict, age_s: float, me: dict) -> Optional[str]:
    """Why the lock `holder` (last touched `age_s` ago) may be taken over by `me`; None: it is live."""
    if holder.get("host") == me["host"]:
        if not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        return None
    if (holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]
            and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]):
        return f"SLURM job {me['slurm_job_id']} was requeued"
    if age_s > STALE_S:
        return f"not touched for {age_s:.0f} s (> {STALE_S:.0f} s)"
    return None


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.me = _owner()
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirBusy; a stale lock is taken over."""
        for _ in range(3):  # another starter may win a takeover race: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock").start()
            return
        raise WorkdirBusy(f"{self.path}: could not take the lock (another run keeps taking it)")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder, age = {}, time.time() - os.stat(self.path).st_mtime  # half-written
        reason = stale_reason(holder, age, self.me)
        if reason is None:
            raise WorkdirBusy(
                f"--workdir={os.path.dirname(self.path)} is in use by a live run (pid "
                f"{holder.get('pid')} on {holder.get('host')}, lock {self.path}); use another "
                f"--workdir, or stop that run")
        aside = f"{self.path}.stale-{self.me['token']}"
        try:
            os.rename(self.path, aside)  # only one taker's rename succeeds
        except FileNotFoundError:
            return
        logging.warning("took over the stale lock of pid %s on %s: %s", holder.get("pid"),
                        holder.get("host"), reason)
        os.remove(aside)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        try:
            with open(self.path) as f:
                mine = json.load(f).get("token") == self.me["token"]
        except (OSError, ValueError):
            return
        if mine:
            os.remove(self.path)


@contextlib.contextmanager
def hold(workdir: str):
    """Every process enters it together: process 0 takes the lock; all raise if it could not."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            os.makedirs(workdir, exist_ok=True)
            lock.acquire()
        except WorkdirBusy as e:
            error = str(e)
        except OSError as e:  # read-only, full, or not permitted
            error = f"--workdir={workdir}: cannot write there ({e.strerror or e})"
    ok = agree.from_process_0(int(error is None))  # every process learns process 0's outcome
    if not ok:
        raise WorkdirBusy(error or f"--workdir={workdir} could not be locked (process 0 says why)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
