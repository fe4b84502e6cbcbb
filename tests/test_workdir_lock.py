"""One live run per workdir: a second one is refused, a stale lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import subprocess_env, train_command

from nodepert_dist import workdir_lock
from nodepert_dist.workdir_lock import WorkdirBusy, WorkdirLock

ENV = subprocess_env()


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(workdir, age_s=0.0, **holder):
    workdir.mkdir(exist_ok=True)
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "t", **holder}))
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_live_lock_on_this_host_refuses_a_dead_one_is_taken_over(tmp_path, live_pid, dead_pid):
    path = _plant(tmp_path, pid=live_pid)
    with pytest.raises(WorkdirBusy, match=f"in use by a live run \\(pid {live_pid} on "):
        WorkdirLock(str(tmp_path)).acquire()
    assert json.loads(path.read_text())["pid"] == live_pid  # untouched
    _plant(tmp_path, pid=dead_pid)
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    holder = json.loads(path.read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(WorkdirBusy):  # now held by this live process
        WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    assert not path.exists()
    assert os.listdir(tmp_path) == []  # the stale lock was not left aside


def test_other_hosts_lock_is_stale_after_the_timeout_or_a_slurm_requeue(tmp_path, monkeypatch):
    _plant(tmp_path, host="elsewhere", pid=1, age_s=60)
    with pytest.raises(WorkdirBusy, match="on elsewhere"):
        WorkdirLock(str(tmp_path)).acquire()
    _plant(tmp_path, host="elsewhere", pid=1, age_s=workdir_lock.STALE_S + 5)
    WorkdirLock(str(tmp_path)).acquire()
    # A requeued SLURM job (same id, higher restart count) takes over its own fresh lock.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _plant(tmp_path, host="elsewhere", pid=1, slurm_job_id="77", slurm_restart_count=1)
    with pytest.raises(WorkdirBusy):  # same restart: that is a live sibling, not a requeue
        WorkdirLock(str(tmp_path)).acquire()
    _plant(tmp_path, host="elsewhere", pid=1, slurm_job_id="77", slurm_restart_count=0)
    WorkdirLock(str(tmp_path)).acquire()


def _train(workdir, mnist_dir):
    return train_command(
        [
            "--n_hl=1",
            "--hl_size=16",
            "--num_epochs=0",
            "--noeval_train",
            f"--data_dir={mnist_dir}",
            f"--workdir={workdir}",
        ],
        devices=0,
        timeout=120,
    )


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_second_run_on_a_live_workdir_is_refused(tmp_path, mnist_dir, live_pid, dead_pid):
    workdir = tmp_path / "run"
    _plant(workdir, pid=live_pid)
    in_flight = workdir / "checkpoints" / ".tmp-step_00000007-abc"  # the live run's save
    in_flight.mkdir(parents=True)
    out = _train(workdir, mnist_dir)
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --workdir={workdir} is in use by a live run (pid {live_pid} on ")
    )
    assert "Traceback" not in out.stderr
    assert in_flight.exists() and not (workdir / "config.json").exists()
    _plant(workdir, pid=dead_pid)  # the same run, crashed: its lock is taken over
    out = _train(workdir, mnist_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "took over the stale lock" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["epoch"] == 0
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released at the end


def test_two_starters_that_judged_one_lock_stale_cannot_both_take_it(
    tmp_path, dead_pid, monkeypatch
):
    """Forced interleavings of two starters A and B that both found the same stale lock."""
    orig_stale, orig_rename = workdir_lock.stale_reason, os.rename
    # 1. A takes the lock over between B's judgment ("stale") and B's move: B must not move
    #    A's live lock aside.
    path = _plant(tmp_path, pid=dead_pid)
    a, b = WorkdirLock(str(tmp_path)), WorkdirLock(str(tmp_path))
    interleaved = []

    def a_runs_after_b_judged(holder, age, me, *args):
        reason = orig_stale(holder, age, me, *args)
        if me is b.me and holder.get("pid") == dead_pid and not interleaved:
            interleaved.append(True)
            a.acquire()
        return reason

    monkeypatch.setattr(workdir_lock, "stale_reason", a_runs_after_b_judged)
    with pytest.raises(WorkdirBusy, match="in use by a live run"):
        b.acquire()
    assert json.loads(path.read_text())["token"] == a.me["token"]
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # no marker, no stale copy left
    monkeypatch.setattr(workdir_lock, "stale_reason", orig_stale)
    a.release()
    # 2. A judges the lock stale while B is moving it: A is refused, B holds the lock.
    path = _plant(tmp_path, pid=dead_pid)
    a, b = WorkdirLock(str(tmp_path)), WorkdirLock(str(tmp_path))
    outcome = []

    def a_starts_while_b_moves(src, dst):
        if src == str(path) and not outcome:
            try:
                a.acquire()
                outcome.append("A took it")
            except WorkdirBusy as e:
                outcome.append(str(e))
        return orig_rename(src, dst)

    monkeypatch.setattr(os, "rename", a_starts_while_b_moves)
    b.acquire()
    monkeypatch.setattr(os, "rename", orig_rename)
    assert "is being taken over by another run (pid" in outcome[0], outcome
    assert json.loads(path.read_text())["token"] == b.me["token"]
    b.release()


STARTER = """
import json, os, sys, time
from nodepert_dist import workdir_lock
workdir, i, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def flag(name):
    return os.path.join(workdir, "flags", name)

def wait_for(name):
    while not os.path.exists(flag(name)):
        time.sleep(0.001)

open(flag(f"ready-{i}"), "w").close()
for r in range(rounds):
    wait_for(f"go-{r}")
    lock = workdir_lock.WorkdirLock(os.path.join(workdir, "run"))
    try:
        lock.acquire()
        got = True
    except workdir_lock.WorkdirBusy:
        got = False
    open(flag(f"tried-{r}-{i}"), "w").close()
    wait_for(f"stop-{r}")  # a holder holds it until every starter has tried
    if got:
        with open(lock.path) as f:
            print(r, "held" if json.load(f)["token"] == lock.me["token"] else "lost", flush=True)
        lock.release()
    else:
        print(r, "busy", flush=True)
    open(flag(f"done-{r}-{i}"), "w").close()
"""


def test_real_starters_racing_for_one_stale_lock_leave_exactly_one_holder(tmp_path, dead_pid):
    n, rounds = 6, 20
    run, flags = tmp_path / "run", tmp_path / "flags"
    flags.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(tmp_path), str(i), str(rounds)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]

    def wait_for(prefix):
        deadline = time.time() + 120
        while len([f for f in os.listdir(flags) if f.startswith(prefix)]) < n:
            assert time.time() < deadline and all(p.poll() is None for p in procs), prefix
            time.sleep(0.002)

    try:
        wait_for("ready-")
        for r in range(rounds):
            _plant(run, pid=dead_pid, token=f"stale{r}")
            (flags / f"go-{r}").touch()  # all at once
            wait_for(f"tried-{r}-")
            (flags / f"stop-{r}").touch()
            wait_for(f"done-{r}-")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs = [p.communicate(timeout=60) for p in procs]
    lines = [line.split() for out, _ in outs for line in out.splitlines()]
    assert len(lines) == n * rounds, [err[-500:] for _, err in outs]
    for r in range(rounds):
        results = sorted(what for rr, what in lines if rr == str(r))
        assert results == ["busy"] * (n - 1) + ["held"], (r, results)
    assert sorted(os.listdir(run)) == []  # no lock, marker or stale copy left


def _start_time(pid):
    """/proc/<pid>/stat field 22: when the process started (clock ticks after boot)."""
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def test_a_lock_is_the_pid_and_its_start_time_and_a_requeued_slurm_job_takes_its_own(
    tmp_path, live_pid, monkeypatch
):
    """In a container the dead run's pid soon belongs to another process: that lock is stale.
    A requeued SLURM job takes over its own lock on the same host even if the pid lives."""
    start = _start_time(live_pid)
    path = _plant(tmp_path, pid=live_pid, pid_start=start)  # the real owner: live
    with pytest.raises(WorkdirBusy, match="in use by a live run"):
        WorkdirLock(str(tmp_path)).acquire()
    _plant(tmp_path, pid=live_pid, pid_start=start - 1)  # that pid was reused since
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    holder = json.loads(path.read_text())
    assert holder["token"] == lock.me["token"] and holder["pid_start"] == _start_time(os.getpid())
    lock.release()
    _plant(tmp_path, pid=live_pid, pid_start=start, boot_id="another-boot")  # before a reboot
    WorkdirLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    _plant(tmp_path, pid=live_pid, pid_start=start, slurm_job_id="77", slurm_restart_count=2)
    with pytest.raises(WorkdirBusy):  # this very attempt's sibling: live
        WorkdirLock(str(tmp_path)).acquire()
    _plant(tmp_path, pid=live_pid, pid_start=start, slurm_job_id="77", slurm_restart_count=1)
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()  # the attempt before the requeue: stale, although its pid is alive here
    assert json.loads(path.read_text())["token"] == lock.me["token"]


def test_a_run_whose_lock_was_taken_over_stops_refreshing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    path = _plant(tmp_path, pid=1, age_s=1000, token="the new owner")  # taken over meanwhile
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime > 900  # not touched: its owner judges it
    lock.release()
    assert json.loads(path.read_text())["token"] == "the new owner"  # not removed either
