"""One run per workdir: `<workdir>/.lock`, held by process 0 of the running job.

The lock is a JSON file {host, boot_id, pid, pid_start, token, started, slurm_job_id,
slurm_restart_count} created with O_EXCL (atomic on local and NFS v3+ file systems). While the
run lives, a thread touches it every HEARTBEAT_S seconds. A lock found at start-up is stale, and
taken over with a warning, when
  - it names this SLURM job with a lower SLURM_RESTART_COUNT (the job was requeued), on any host;
  - it names this host and its process is gone: the pid is not alive, or it now belongs to a
    process that started at another time (pids are reused, quickly so in containers), or the
    host has rebooted since (another boot id);
  - it names another host and was not touched for STALE_S seconds (10 heartbeats missed).
Otherwise the run is refused with one line naming the owner: a second run would clobber the live
run's config, metrics and in-flight checkpoint.

Taking over is exclusive. Two starters may both judge the same lock stale; only the one that
creates `.lock.takeover-<stale token>.<n>` (O_EXCL) may move that lock aside, and it does so only
if the lock still carries that token (checked before the rename and again after it). A starter
that finds the marker held by a live starter is refused. A marker left by a starter that died
mid-takeover is judged by the same rules (with TAKEOVER_STALE_S for other hosts), and the next
starter claims the next `<n>`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import socket
import threading
import time

import jax
from absl import logging

from nodepert_dist import agree

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0
TAKEOVER_STALE_S = 60.0  # a takeover takes milliseconds: its marker is abandoned after this


class WorkdirBusy(ValueError):
    """Another live run holds the workdir (one-line message)."""


def _alive(pid: int) -> bool:
    if pid <= 0:  # no pid recorded (0 and -1 would name a process group and every process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if unknown.
    With the pid it names one process: a reused pid has a later start."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields after "(comm)" start at 3


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "token": secrets.token_hex(8),
        "started": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def stale_reason(holder: dict, age_s: float, me: dict, stale_s: float = STALE_S) -> str | None:
    """Why the lock `holder` (last touched `age_s` ago) may be taken over by `me`; None: live."""
    if (
        holder.get("slurm_job_id")
        and holder["slurm_job_id"] == me["slurm_job_id"]
        and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]
    ):
        return f"SLURM job {me['slurm_job_id']} was requeued"
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", -1))
        if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return "this host has rebooted since"
        if not _alive(pid):
            return f"its process {pid} on this host is gone"
        started, now = holder.get("pid_start"), process_start(pid)
        if started is not None and now is not None and now != started:
            return f"its process {pid} on this host is gone (that pid is now another process)"
        return None
    if age_s > stale_s:
        return f"not touched for {age_s:.0f} s (> {stale_s:.0f} s)"
    return None


def _read(path: str) -> tuple[dict | None, float, int | None]:
    """(content, age in s, inode) of a lock or marker file; content None: it is gone.
    A half-written file reads as {} (its age decides)."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None, 0.0, None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return holder, time.time() - st.st_mtime, st.st_ino


def _identity(holder: dict, inode: int | None) -> str:
    """The name of one lock file: its token (a half-written one: its inode)."""
    return str(holder.get("token") or f"inode{inode}")


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.me = _owner()
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirBusy; a stale lock is taken over."""
        for _ in range(5):  # a lock released or replaced meanwhile: look again
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
        raise WorkdirBusy(f"{self.path}: could not take the lock (other runs keep taking it)")

    def _busy(self, holder: dict, what: str) -> WorkdirBusy:
        return WorkdirBusy(
            f"--workdir={os.path.dirname(self.path)} is {what} (pid {holder.get('pid')} on "
            f"{holder.get('host')}, lock {self.path}); use another --workdir, or stop that run"
        )

    def _take_over_if_stale(self) -> None:
        holder, age, inode = _read(self.path)
        if holder is None:
            return  # released meanwhile: try again
        reason = stale_reason(holder, age, self.me)
        if reason is None:
            raise self._busy(holder, "in use by a live run")
        ident = _identity(holder, inode)
        claim = self._claim(ident)
        if claim is None:
            return  # another starter just finished taking it over: look again
        try:
            current, _, inode = _read(self.path)
            if current is None or _identity(current, inode) != ident:
                return  # taken over or released meanwhile: look again
            aside = f"{self.path}.stale-{self.me['token']}"
            os.rename(self.path, aside)
            moved, _, inode = _read(aside)
            if moved is not None and _identity(moved, inode) != ident:
                # Replaced between the check and the rename (its owner was alive after all and
                # released it, and a new run locked): put the new lock back, never overwriting.
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                os.remove(aside)
                return
            os.remove(aside)
            logging.warning(
                "took over the stale lock of pid %s on %s: %s",
                holder.get("pid"),
                holder.get("host"),
                reason,
            )
        finally:
            for marker in glob.glob(glob.escape(f"{self.path}.takeover-{ident}.") + "*"):
                if int(marker.rsplit(".", 1)[1]) <= claim:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(marker)

    def _claim(self, ident: str) -> int | None:
        """Creates the takeover marker of the lock `ident` and returns its generation; None if
        another starter's takeover finished meanwhile; WorkdirBusy while a live one holds it."""
        for generation in range(100):
            marker = f"{self.path}.takeover-{ident}.{generation}"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                taker, age, _ = _read(marker)
                if taker is None:
                    return None
                if stale_reason(taker, age, self.me, TAKEOVER_STALE_S) is None:
                    raise self._busy(taker, "being taken over by another run") from None
                continue  # its starter died mid-takeover: claim the next generation
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return generation
        raise WorkdirBusy(f"{self.path}: too many abandoned takeovers ({marker}); remove them")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder, _, _ = _read(self.path)
            if not holder or holder.get("token") != self.me["token"]:
                logging.error(
                    "the lock %s is no longer this run's (taken over by pid %s on %s "
                    "after missed heartbeats?)",
                    self.path,
                    (holder or {}).get("pid"),
                    (holder or {}).get("host"),
                )
                return  # never refresh another run's lock
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        holder, _, _ = _read(self.path)
        if holder and holder.get("token") == self.me["token"]:
            os.remove(self.path)


@contextlib.contextmanager
def hold(workdir: str):
    """Every process enters it together: process 0 takes the lock; all raise if it could not.
    Re-entrant in a process (the crash guard holds it across its attempts and rollbacks)."""
    key = os.path.realpath(workdir)
    if key in _HELD:  # every process knows: it entered the outer hold too
        yield
        return
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
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        if lock is not None:
            lock.release()


_HELD: set = set()  # real paths of the workdirs this process holds (inside `hold`)
