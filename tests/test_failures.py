"""How runs end when something goes wrong or stops early: one line, the exit code, no bad files."""

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from conftest import train_command as _train

from nodepert_dist import checkpoint, checkpoint_layout, files, run_record

TINY = ["--n_hl=2", "--hl_size=32", "--batchsize=256", "--num_epochs=1", "--noeval_train"]


def _read(array_dir):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": array_dir}}
    return ts.open(spec).result().read().result()


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_diverging_run_stops_at_the_step_and_saves_nothing_non_finite(tmp_path, mnist_dir):
    # With this seed and net, ce at lr=1e4 gives a NaN loss at step 3 of epoch 1 (checked by
    # hand; the noise's sign layout of noise._sign_layout: 17 with the one before it);
    # a checkpoint every step puts a save right before and right after the first NaN.
    workdir = tmp_path / "run"
    out = _train(
        [
            *TINY,
            "--loss=ce",
            "--lr=1e4",
            "--checkpoint_every_steps=1",
            "--keep_checkpoints=0",
            f"--data_dir={mnist_dir}",
            f"--workdir={workdir}",
        ]
    )
    assert out.returncode == 1, out.stderr[-3000:]  # 1: the error; an abort at exit would be 134
    assert "error: the training loss is nan at step 3 (epoch 1)" in out.stderr
    assert "lower --lr" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""  # no metrics row printed as if it were a result
    steps = checkpoint_layout.committed_steps(str(workdir / "checkpoints"))
    assert steps == [1, 2]  # every save before the NaN committed, none after
    for step in steps:
        for array in glob.glob(
            os.path.join(
                checkpoint_layout.step_dir(str(workdir / "checkpoints"), step), "arrays", "*"
            )
        ):
            assert np.all(np.isfinite(_read(array))), array
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
    saver = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint_layout.CheckpointError, match="step 3 holds NaN or Inf"):
        saver.save(3, {"w": jnp.array([1.0, jnp.nan]), "step": jnp.int32(3)}, meta={})
    saver.wait()
    assert checkpoint_layout.committed_steps(str(tmp_path)) == []


def test_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    out = _train([f"--workdir={path}"], timeout=120)
    assert out.returncode != 0
    assert f"error: --workdir={path} is a file, not a folder" in out.stderr
    assert "Traceback" not in out.stderr
    assert path.read_text() == "not a folder"


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_max_steps_and_finished_runs_say_so_at_the_end(tmp_path, mnist_dir):
    common = [
        *TINY,
        "--validation_size=55000",
        f"--data_dir={mnist_dir}",  # 19 steps an epoch
        f"--workdir={tmp_path / 'run'}",
    ]
    out = _train([*common, "--max_steps=5"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == (
        "stopped at --max_steps=5 (step 5, 0 of 1 epochs done); rerun with a larger "
        "--max_steps to continue"
    )
    out = _train(common)  # resumes and finishes: no note, the last line is the final row
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["epoch"] == 1
    out = _train(common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("already finished: 1 epochs done (step 19)")


def test_metrics_write_null_for_non_finite_values(tmp_path):
    from nodepert_dist import metrics

    def strict(line):  # json.loads accepts NaN by default; real JSON does not
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))

    writer = metrics.MetricsWriter(str(tmp_path), {"lr": 1.0})
    written = writer.write(
        {
            "epoch": 1,
            "step": 5,
            "test_acc": 0.1,
            "test_loss": float("nan"),
            "train_loss": float("inf"),
        }
    )
    assert written["test_loss"] is None and written["train_loss"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(lines[0]) == {
        "epoch": 1,
        "step": 5,
        "test_acc": 0.1,
        "test_loss": None,
        "train_loss": None,
    }
    writer.truncate_after(1)  # the rewrite path too
    assert strict((tmp_path / "metrics.jsonl").read_text())["test_loss"] is None


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_a_fresh_start_moves_an_earlier_history_aside_and_readers_see_one_run(
    tmp_path, mnist_dir, monkeypatch
):
    """--checkpoint_every_epochs=0 (the variance sweeps' setting): a run stopped in epoch 2 leaves
    rows 0 and 1 and no checkpoint; the same command again starts over. It must not append a
    second history (0, 1, 0, 1, 2): the first is moved to earlier_runs/1/, kept."""
    from test_sweep import make_spec

    from nodepert_dist import preempt, sweep, sweep_report, train

    c = train.Config(
        n_hl=1,
        hl_size=16,
        validation_size=59000,
        eval_train=False,  # 7 steps/epoch
        eval_batchsize=2000,
        num_epochs=2,
        checkpoint_every_epochs=0,
        data_dir=mnist_dir,
        workdir=str(tmp_path / "run"),
    )
    monkeypatch.setenv(preempt.TEST_SIGNAL_ENV, "10")  # epoch 2, step 3
    with pytest.raises(preempt.Preempted, match="no checkpoint"):
        train.run(c)
    first = run_record.read_metrics(c.workdir)
    assert [r["epoch"] for r in first] == [0, 1]
    monkeypatch.delenv(preempt.TEST_SIGNAL_ENV)
    rows, _ = train.run(c)
    assert [r["epoch"] for r in run_record.read_metrics(c.workdir)] == [0, 1, 2]
    with open(os.path.join(c.workdir, "metrics.csv")) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "0", "1", "2"]
    earlier = os.path.join(c.workdir, "earlier_runs", "1")
    assert sorted(os.listdir(earlier)) == ["config.json", "metrics.csv", "metrics.jsonl"]
    assert files.read_jsonl(os.path.join(earlier, "metrics.jsonl")) == first
    # Readers of a workdir written before this rule (two runs appended, plus a crash-guard event)
    # see its last run: the sweep's table and run_record.epoch_rows.
    runs = sweep.expand(sweep.load_spec(make_spec(tmp_path, grid={"lr": [0.1]}, seeds=1)))
    os.makedirs(runs[0]["workdir"])
    with open(os.path.join(runs[0]["workdir"], "config.json"), "w") as f:
        json.dump({"num_epochs": 2}, f)
    legacy = [
        {"epoch": 0, "test_acc": 0.1},
        {"epoch": 1, "test_acc": 0.3, "epoch_time": 1.0, "examples_per_s": 10.0},
        {"event": "rollback", "last_good_epoch": 0},
        {"epoch": 0, "test_acc": 0.1},
        {"epoch": 1, "test_acc": 0.91, "epoch_time": 2.0, "examples_per_s": 20.0},
        {"epoch": 2, "test_acc": 0.95, "epoch_time": 2.0, "examples_per_s": 20.0},
    ]
    with open(os.path.join(runs[0]["workdir"], "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in legacy)
    assert [r["epoch"] for r in run_record.epoch_rows(legacy)] == [0, 1, 2]
    cells = [c.strip() for c in sweep_report.table(runs).splitlines()[2].split("|")[1:-1]]
    # the last run: 2 epochs, final 95%, 90% after 1 epoch (2 s), 93% after 2 (4 s)
    assert cells[1:6] == ["2", "95.0 ± 0.0", "95.0 ± 0.0", "2 (1)", "4 (2)"], cells
