"""Crash detection and the crash guard (nodepert_dist/crash_guard.py), with an lr that blows up."""

import json
import os
import subprocess
import sys

import pytest

from nodepert_dist import checkpoint_layout, crash_guard, files, run_record, train

# SGD with cross-entropy at lr 1e6 overflows within the first steps (measured: lr 1e4 gave inf at step
# 10 on MNIST fc); lr 1 trains. 1000 training examples (7 steps an epoch) keep epochs short.
BLOWS_UP = dict(
    update_rule="sgd",
    loss="ce",
    lr=1e6,
    n_hl=1,
    hl_size=16,
    validation_size=59000,
    eval_train=False,
    eval_batchsize=2000,
    num_epochs=2,
    crash_guard=True,
)


def cfg(tmp_path, mnist_dir, **kw):
    return train.Config(
        **{**BLOWS_UP, "data_dir": mnist_dir, "workdir": str(tmp_path / "run"), **kw}
    )


def test_first_crash_is_25_points_below_the_best_so_far():
    accs = [0.1, 0.8, 0.9, 0.7, 0.64, 0.95]
    rows = [{"epoch": i, "test_acc": a} for i, a in enumerate(accs)] + [{"event": "rollback"}]
    assert crash_guard.first_crash(rows, 25)["epoch"] == 4  # 90 -> 64: 26 points
    assert crash_guard.first_crash(rows, 30) is None
    assert (
        crash_guard.first_crash(rows[:3] + [{"epoch": 3, "test_acc": float("nan")}], 25)["epoch"]
        == 3
    )
    with pytest.raises(crash_guard.Crashed, match="from 90.0% to 64.0% at epoch 4"):
        crash_guard.Detector(25).after_row(rows[4], rows[:5])


def test_guard_rolls_back_lowers_lr_and_finishes(tmp_path, mnist_dir):
    c = cfg(tmp_path, mnist_dir, crash_lr_factor=1e-6)  # 1e6 -> 1: the second attempt trains
    rows, _ = crash_guard.run(train.run, c)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1][
        "test_acc"
    ] > 0.15  # chance: 0.1; 14 steps
    logged = run_record.read_metrics(c.workdir)
    events = [r for r in logged if "event" in r]
    assert len(events) == 1 and events[0]["reason"] == "non_finite_loss"
    assert events[0]["lr"] == 1e6 and events[0]["new_lr"] == pytest.approx(1.0)
    assert [r["epoch"] for r in run_record.epoch_rows(logged)] == [0, 1, 2]  # one row per epoch
    with open(os.path.join(c.workdir, "config.json")) as f:
        assert json.load(f)["lr"] == pytest.approx(1.0)  # config.json has the lr that ran
    with open(os.path.join(c.workdir, "metrics.csv")) as f:
        assert "event" not in f.read()
    # A rerun (e.g. after preemption) keeps the lowered lr: the run is already finished.
    assert crash_guard.run(train.run, c)[1].startswith("already finished")


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_guard_gives_up_after_k_rollbacks_with_one_line(tmp_path, mnist_dir):
    args = {**BLOWS_UP, "crash_max_rollbacks": 2, "crash_lr_factor": 0.5}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodepert_dist.train",
            f"--data_dir={mnist_dir}",
            f"--workdir={tmp_path / 'run'}",
            "--cpu_devices=1",
        ]
        + [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: crash guard gave up after 2 rollback(s) (lr 1e+06 -> 250000)"), (
        last
    )
    assert "Traceback" not in proc.stderr
    events = [r for r in run_record.read_metrics(str(tmp_path / "run")) if "event" in r]
    assert [e["event"] for e in events] == ["rollback", "rollback", "gave_up"]


class _FakeCrash:
    """Test hook: epoch 2's test accuracy reads 0 while the lr is the original one."""

    def __init__(self, lr):
        self.lr = lr

    def start(self, ctx):
        self.active = ctx.cfg.lr == self.lr

    def after_row(self, row, rows):
        if self.active and row["epoch"] == 2:
            row["test_acc"] = 0.0


def test_accuracy_crash_rolls_back_to_the_last_good_epoch(tmp_path, mnist_dir):
    c = cfg(
        tmp_path,
        mnist_dir,
        lr=0.5,
        num_epochs=3,
        keep_checkpoints=0,
        crash_points=5,
        checkpoint_every_steps=3,
    )
    rows, _ = crash_guard.run(train.run, c, hooks=[_FakeCrash(0.5)])
    events = [r for r in run_record.read_metrics(c.workdir) if "event" in r]
    assert len(events) == 1 and events[0]["reason"] == "crash"
    assert events[0]["last_good_epoch"] == 1 and events[0]["resume_step"] == 7
    # the checkpoints after epoch 1 (steps 9, 12) were set aside, not deleted, with the rows
    aside = sorted(os.listdir(tmp_path / "run" / "rolled_back" / "1"))
    assert aside == ["metrics.jsonl", "step_00000009", "step_00000012"]  # 14 was never saved
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[2]["test_acc"] > 0
    assert checkpoint_layout.committed_steps(os.path.join(c.workdir, "checkpoints"))[-1] == 21


class _FakeCrashRecording(_FakeCrash):
    """_FakeCrash that also keeps the rows the first attempt had when it crashed."""

    def after_row(self, row, rows):
        super().after_row(row, rows)
        if self.active and row["epoch"] == 2:
            self.rows_at_crash = [dict(r) for r in rows]


def test_guard_with_step_checkpoints_and_default_retention_keeps_its_rollback_target(
    tmp_path, mnist_dir
):
    """What users run: a checkpoint every 2 steps, --keep_checkpoints=3 (the default). Epoch 1
    ends at step 7, epoch 2 (crashed) at step 14; the newest three when it crashes are steps 8,
    10, 12, so the checkpoint of step 7 survives only because it is the rollback target."""
    c = cfg(tmp_path, mnist_dir, lr=0.5, num_epochs=3, crash_points=5, checkpoint_every_steps=2)
    assert c.keep_checkpoints == 3  # the default
    hook = _FakeCrashRecording(0.5)
    rows, _ = crash_guard.run(train.run, c, hooks=[hook])
    events = [r for r in run_record.read_metrics(c.workdir) if "event" in r]
    assert len(events) == 1 and events[0]["reason"] == "crash"
    assert (events[0]["last_good_epoch"], events[0]["resume_step"]) == (1, 7)
    # Nothing the guard could keep was thrown away: epochs 0 and 1 are the first attempt's rows.
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[:2] == hook.rows_at_crash[:2]
    aside = tmp_path / "run" / "rolled_back" / "1"
    assert sorted(os.listdir(aside)) == [
        "metrics.jsonl",
        "step_00000008",
        "step_00000010",
        "step_00000012",
    ]
    crashed = files.read_jsonl(str(aside / "metrics.jsonl"))  # the rows the rollback replaced
    assert [(r["epoch"], r["step"]) for r in crashed] == [(2, 14)]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # lr 1e300 -> float32 inf
def test_non_finite_state_at_a_save_rolls_back_under_the_lock_and_a_signal_then_is_kept(
    tmp_path, mnist_dir, monkeypatch
):
    """lr 1e300 (inf in float32) gives a finite loss at step 1 but an infinite state, which the
    checkpoint save of step 1 refuses: a crash for the guard. The rollback holds the workdir lock;
    a SIGTERM during it stops the run (Preempted, exit 75) after the rollback, and the rerun
    finishes with the lowered lr."""
    import signal

    from nodepert_dist import preempt, workdir_lock

    c = cfg(tmp_path, mnist_dir, lr=1e300, crash_lr_factor=1e-300, checkpoint_every_steps=1)
    seen = []
    real_roll_back = crash_guard._roll_back

    def roll_back_and_check(*args):
        with pytest.raises(workdir_lock.WorkdirBusy, match="in use by a live run"):
            workdir_lock.WorkdirLock(c.workdir).acquire()  # another run cannot start now
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption arrives during the rollback
        seen.append("rolled back")
        return real_roll_back(*args)

    monkeypatch.setattr(crash_guard, "_roll_back", roll_back_and_check)
    with pytest.raises(preempt.Preempted, match="during a crash-guard rollback"):
        crash_guard.run(train.run, c)
    assert seen == ["rolled back"]
    events = [r for r in run_record.read_metrics(c.workdir) if "event" in r]
    assert [(e["event"], e["reason"]) for e in events] == [("rollback", "non_finite_state")]
    assert "step 1 holds NaN or Inf" in events[0]["detail"]
    assert not os.path.exists(os.path.join(c.workdir, ".lock"))  # released on the way out
    rows, _ = crash_guard.run(train.run, c)  # the same command again: lr 1e300 * 1e-300 = 1
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["test_acc"] > 0.15
    assert len([r for r in run_record.read_metrics(c.workdir) if "event" in r]) == 1


def test_guard_without_checkpoints_is_refused_before_any_work(tmp_path, mnist_dir):
    c = cfg(tmp_path, mnist_dir, checkpoint_every_epochs=0)
    with pytest.raises(ValueError, match="--crash_guard rolls back to checkpoints: set "):
        crash_guard.run(train.run, c)
    assert not os.path.exists(c.workdir)


class _FakeCrashLosingTheTarget(_FakeCrash):
    """_FakeCrash that also deletes the checkpoint the guard would roll back to (by hand)."""

    def start(self, ctx):
        super().start(ctx)
        self.workdir = ctx.cfg.workdir

    def after_row(self, row, rows):
        super().after_row(row, rows)
        if self.active and row["epoch"] == 2:
            import shutil

            shutil.rmtree(checkpoint_layout.step_dir(os.path.join(self.workdir, "checkpoints"), 7))


def test_guard_with_no_rollback_target_left_stops_with_one_line_and_keeps_the_rows(
    tmp_path, mnist_dir
):
    c = cfg(tmp_path, mnist_dir, lr=0.5, num_epochs=3, crash_points=5, checkpoint_every_steps=2)
    with pytest.raises(
        crash_guard.GaveUp,
        match="no checkpoint at or before the last good epoch 1 "
        r"\(step 7\) is left in ",
    ):
        crash_guard.run(train.run, c, hooks=[_FakeCrashLosingTheTarget(0.5)])
    logged = run_record.read_metrics(c.workdir)
    assert [r["epoch"] for r in run_record.epoch_rows(logged)] == [0, 1, 2]  # nothing truncated
    assert [r["event"] for r in logged if "event" in r] == ["gave_up"]
    assert checkpoint_layout.committed_steps(os.path.join(c.workdir, "checkpoints")) == [8, 10, 12]
