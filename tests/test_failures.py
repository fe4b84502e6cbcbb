"""How runs end when something goes wrong or stops early: one line, the exit code, no bad files."""

import glob
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from conftest import REPO
from nodepert_dist import checkpoint

ENV = dict(os.environ, PYTHONPATH=str(REPO))
TINY = ["--n_hl=2", "--hl_size=32", "--batchsize=256", "--num_epochs=1", "--noeval_train"]


def _train(args, timeout=300):
    cmd = [sys.executable, "-m", "nodepert_dist.train", "--cpu_devices=8", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def _read(array_dir):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": array_dir}}
    return ts.open(spec).result().read().result()


def test_diverging_run_stops_at_the_step_and_saves_nothing_non_finite(tmp_path, mnist_dir):
    # With this seed and net, ce at lr=1e4 gives a NaN loss at step 17 of epoch 1 (checked by
    # hand; noise keyed by tap name since the taps rewrite);
    # a checkpoint every step puts a save right before and right after the first NaN.
    workdir = tmp_path / "run"
    out = _train([*TINY, "--loss=ce", "--lr=1e4", "--checkpoint_every_steps=1",
                  "--keep_checkpoints=0", f"--data_dir={mnist_dir}", f"--workdir={workdir}"])
    assert out.returncode == 1, out.stderr[-3000:]  # 1: the error; an abort at exit would be 134
    assert "error: the training loss is nan at step 17 (epoch 1)" in out.stderr
    assert "lower --lr" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""  # no metrics row printed as if it were a result
    steps = checkpoint.committed_steps(str(workdir / "checkpoints"))
    assert steps == list(range(1, 17))  # every save before the NaN committed, none after
    for step in steps:
        for array in glob.glob(os.path.join(checkpoint.step_dir(str(workdir / "checkpoints"), step),
                                            "arrays", "*")):
            assert np.all(np.isfinite(_read(array))), array
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
    saver = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="step 3 holds NaN or Inf"):
        saver.save(3, {"w": jnp.array([1.0, jnp.nan]), "step": jnp.int32(3)}, meta={})
    saver.wait()
    assert checkpoint.committed_steps(str(tmp_path)) == []


def test_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    out = _train([f"--workdir={path}"], timeout=120)
    assert out.returncode != 0
    assert f"error: --workdir={path} is a file, not a folder" in out.stderr
    assert "Traceback" not in out.stderr
    assert path.read_text() == "not a folder"


def test_max_steps_and_finished_runs_say_so_at_the_end(tmp_path, mnist_dir):
    common = [*TINY, f"--data_dir={mnist_dir}", f"--workdir={tmp_path / 'run'}"]
    out = _train([*common, "--max_steps=5"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == (
        "stopped at --max_steps=5 (step 5, 0 of 1 epochs done); rerun with a larger "
        "--max_steps to continue")
    out = _train(common)  # resumes and finishes: no note, the last line is the final row
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["epoch"] == 1
    out = _train(common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("already finished: 1 epochs done (step 234)")


def test_metrics_write_null_for_non_finite_values(tmp_path):
    from nodepert_dist import metrics

    def strict(line):  # json.loads accepts NaN by default; real JSON does not
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))

    writer = metrics.MetricsWriter(str(tmp_path), {"lr": 1.0})
    written = writer.write({"epoch": 1, "step": 5, "test_acc": 0.1, "test_loss": float("nan"),
                            "train_loss": float("inf")})
    assert written["test_loss"] is None and written["train_loss"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(lines[0]) == {"epoch": 1, "step": 5, "test_acc": 0.1, "test_loss": None,
                                "train_loss": None}
    writer.truncate_after(1)  # the rewrite path too
    assert strict((tmp_path / "metrics.jsonl").read_text())["test_loss"] is None
