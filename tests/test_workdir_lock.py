"""One live run per workdir: a second one is refused, a stale lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from nodepert_dist import workdir_lock
from nodepert_dist.workdir_lock import WorkdirBusy, WorkdirLock

ENV = dict(os.environ, PYTHONPATH=str(REPO))


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
    cmd = [sys.executable, "-m", "nodepert_dist.train", "--n_hl=1", "--hl_size=16",
           "--num_epochs=0", "--noeval_train", f"--data_dir={mnist_dir}", f"--workdir={workdir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)


def test_second_run_on_a_live_workdir_is_refused(tmp_path, mnist_dir, live_pid, dead_pid):
    workdir = tmp_path / "run"
    _plant(workdir, pid=live_pid)
    in_flight = workdir / "checkpoints" / ".tmp-step_00000007-abc"  # the live run's save
    in_flight.mkdir(parents=True)
    out = _train(workdir, mnist_dir)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={workdir} is in use by a live run (pid {live_pid} on ")
    assert "Traceback" not in out.stderr
    assert in_flight.exists() and not (workdir / "config.json").exists()
    _plant(workdir, pid=dead_pid)  # the same run, crashed: its lock is taken over
    out = _train(workdir, mnist_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "took over the stale lock" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["epoch"] == 0
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released at the end
