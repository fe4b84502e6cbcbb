"""Every experiment command end to end on a tiny configuration: its CSV and PNG, and resuming.

Each runs `python -m nodepert_dist.experiments NAME` on 1 CPU device, 1000 MNIST training
examples and a 784-16-10 net (the `tiny` preset), one epoch unless it needs more.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

ENV = subprocess_env()
TINY = ["--preset=tiny", "--cpu_devices=1", "--num_epochs=1"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The commands share one persistent XLA compilation cache: the same tiny steps compile
    once for the whole module instead of once per command."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    ENV["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    yield


def experiment(name, out, *args, timeout=240):
    cmd = [sys.executable, "-m", "nodepert_dist.experiments", name, *TINY, f"--out={out}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def test_vary_lr_and_resume(tmp_path, mnist_dir):
    out = tmp_path / "vary"
    experiment("vary-lr", out, f"--data_dir={mnist_dir}", "--lrs=1.0")
    rows = table(out / "vary_lr.csv")
    assert [(r["update_rule"], r["status"]) for r in rows] == [
        ("np", "finished"),
        ("sgd", "finished"),
    ]
    assert all(float(r["final_acc"]) > 0.15 for r in rows)  # chance is 0.1
    assert_png(out / "vary_lr.png")
    # Rerun: nothing is trained again (the workdirs are finished), the same table comes out.
    mtime = os.path.getmtime(out / "runs" / "update_rule=np,lr=1.0,seed=0" / "metrics.jsonl")
    experiment("vary-lr", out, f"--data_dir={mnist_dir}", "--lrs=1.0")
    assert table(out / "vary_lr.csv") == rows
    assert (
        os.path.getmtime(out / "runs" / "update_rule=np,lr=1.0,seed=0" / "metrics.jsonl") == mtime
    )


def test_grad_stats_resumes_without_duplicate_rows(tmp_path, mnist_dir):
    out = tmp_path / "gs"
    args = [
        f"--data_dir={mnist_dir}",
        "--every=2",
        "--draws=2",
        "--probe_size=64",
        "--checkpoint_every_steps=2",
    ]
    experiment("grad-stats", out, *args, "--max_steps=5")  # preempted after step 5, saved at 4
    experiment("grad-stats", out, *args)
    rows = table(out / "grad_stats.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8, 10]
    for r in rows:
        assert 0 <= float(r["all_angle"]) <= 180 and 0 <= float(r["all_sign_sym"]) <= 1
        assert float(r["all_ratio"]) > 0 and float(r["layer0_rel_var"]) > 0
    assert_png(out / "grad_stats.png")


def test_crash_timing_finds_and_replays_a_crash(tmp_path, mnist_dir):
    # SGD + cross-entropy at lr 3 on the tiny net: test accuracy 10, 11, 19, then 11% at epoch
    # 3, a crash by a 5-point criterion; lr 0.01 does not crash.
    out = tmp_path / "crash"
    experiment(
        "crash-timing",
        out,
        f"--data_dir={mnist_dir}",
        "--num_epochs=3",
        "--update_rule=sgd",
        "--loss=ce",
        "--lrs=0.01,3",
        "--crash_points=5",
        "--replay_every=3",
        "--replay_draws=2",
        "--probe_size=64",
    )
    rows = {float(r["lr"]): r for r in table(out / "crash_timing.csv")}
    assert rows[0.01]["status"] == "finished" and rows[0.01]["crash_epoch"] == ""
    assert rows[3.0]["status"] == "crashed" and rows[3.0]["crash_epoch"] == "3"
    replay = table(out / "crash_replay.csv")
    assert [int(r["step"]) for r in replay] == [20, 21, 24, 27, 30]  # from epoch 2's checkpoint
    # the replay reproduces the crash exactly (same data order and noise)
    assert replay[0]["replay_test_acc"] == replay[0]["original_test_acc"] != ""
    for key in ("layer0_w_norm", "layer1_act_norm", "all_angle", "all_norm_np"):
        assert key in replay[0]
    assert_png(out / "crash_timing.png")
    assert_png(out / "crash_replay.png")


def test_crash_timing_as_one_population_finds_the_same_crash(tmp_path, mnist_dir):
    """The grid above as one --population (lr x 2 seeds, 4 members): lr 3 crashes at epoch 3
    (seed 0, as its solo run above), lr 0.01 finishes; a frozen member's rows stop counting
    at its crash. Replay needs per-run checkpoints: refused in one line."""
    out = tmp_path / "crash"
    args = [
        f"--data_dir={mnist_dir}",
        "--num_epochs=3",
        "--update_rule=sgd",
        "--loss=ce",
        "--lrs=0.01,3",
        "--crash_points=5",
        "--as_population",
    ]
    experiment("crash-timing", out, *args, "--replay_runs=0", "--seeds=2")
    rows = {(float(r["lr"]), int(r["seed"])): r for r in table(out / "crash_timing.csv")}
    assert sorted(rows) == [(0.01, 0), (0.01, 1), (3.0, 0), (3.0, 1)]
    for seed in (0, 1):
        assert rows[0.01, seed]["status"] == "finished" and rows[0.01, seed]["crash_epoch"] == ""
    assert rows[3.0, 0]["status"] == "crashed" and rows[3.0, 0]["crash_epoch"] == "3"
    assert rows[3.0, 0]["epochs_trained"] == "3"
    assert not (out / "crash_replay.csv").exists()
    cmd = [
        sys.executable,
        "-m",
        "nodepert_dist.experiments",
        "crash-timing",
        *TINY,
        f"--out={tmp_path / 'refused'}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)
    assert proc.returncode != 0 and "add --replay_runs=0" in proc.stderr.splitlines()[-1]


def test_linesearch(tmp_path, mnist_dir):
    out = tmp_path / "ls"
    experiment(
        "linesearch",
        out,
        f"--data_dir={mnist_dir}",
        "--widths=8,32",
        "--draws=2",
        "--probe_size=200",
        "--lrs=0.01,1,100,10000",
    )
    rows = table(out / "linesearch.csv")
    assert len(rows) == 2 * 2 * 4
    lrs = table(out / "linesearch_lrs.csv")
    assert {(r["width"], r["rule"]) for r in lrs} == {
        (w, u) for w in ("8", "32") for u in ("np", "sgd")
    }
    sgd = [float(r["delta_loss"]) for r in rows if r["rule"] == "sgd" and r["width"] == "32"]
    assert sgd[0] < 0  # a small SGD step lowers the loss
    assert_png(out / "linesearch.png")


def test_delta_loss(tmp_path, mnist_dir):
    out = tmp_path / "dl"
    experiment(
        "delta-loss", out, f"--data_dir={mnist_dir}", "--per_epoch=2", "--window=2", "--lrs=0.5,1.0"
    )
    rows = table(out / "delta_loss.csv")
    assert [(r["rule"], r["point"], r["updates"]) for r in rows] == [
        ("np", "0", "2"),
        ("np", "1", "2"),
        ("sgd", "0", "2"),
        ("sgd", "1", "2"),
    ]
    assert float(rows[2]["delta_loss"]) < 0  # SGD's first updates lower their batch's loss
    assert_png(out / "delta_loss.png")


def test_adam_np(tmp_path, mnist_dir):
    out = tmp_path / "adam"
    experiment("adam-np", out, f"--data_dir={mnist_dir}", "--lrs=0.001")
    rows = table(out / "adam_np.csv")
    assert [r["optimizer"] for r in rows] == ["sgd", "adam"]
    config = json.loads(
        (out / "runs" / "optimizer=adam,lr=0.001,seed=0" / "config.json").read_text()
    )
    assert config["optimizer"] == "adam" and config["update_rule"] == "np"
    assert_png(out / "adam_np.png")


def test_landscape(tmp_path, mnist_dir):
    out = tmp_path / "land"
    experiment(
        "landscape",
        out,
        f"--data_dir={mnist_dir}",
        "--every=3",
        "--grid=5",
        "--surface_size=200",
        "--lr=1",
    )
    surface = table(out / "landscape.csv")
    path = table(out / "landscape_trajectory.csv")
    assert len(surface) == 25
    assert [int(r["step"]) for r in path] == [0, 3, 6, 9, 10]
    final = path[-1]  # the final point is the origin of the surface
    assert abs(float(final["alpha"])) < 1e-5 and abs(float(final["beta"])) < 1e-5
    assert float(path[0]["loss"]) > float(final["loss"])
    assert_png(out / "landscape.png")


# Every setting that shapes the train state or the model: the optimizer, its aids and schedule,
# the compute dtype; and an estimator option. --loss=ce: landscape's trajectory loss once
# took one example's logits for every label (ce then failed, mse was silently wrong).
ANY_RUN = [
    "--optimizer=adam",
    "--lr=1e-3",
    "--lr_schedule=cosine",
    "--warmup_epochs=0.5",
    "--weight_norm",
    "--clip_norm=1",
    "--wd=1e-5",
    "--dtype=bfloat16",
    "--sigma=0.03",
    "--loss=ce",
    "--np_layerwise",
    "--update_rule=np",
]


def test_landscape_and_linesearch_restore_any_run(tmp_path, mnist_dir):
    """Both restore their runs' checkpoints through the one run set-up (run_setup.build):
    every setting of the run, whatever the optimizer, schedule, weight norm and dtype."""
    out = tmp_path / "land"
    experiment(
        "landscape",
        out,
        f"--data_dir={mnist_dir}",
        "--every=3",
        "--grid=3",
        "--surface_size=200",
        *ANY_RUN,
    )
    path = table(out / "landscape_trajectory.csv")
    assert [int(r["step"]) for r in path] == [0, 3, 6, 9, 10]
    assert len(table(out / "landscape.csv")) == 9
    # cross-entropy of 10 classes near chance: ~2.3 each (not one example's logits per label)
    assert all(1 < float(r["loss"]) < 4 for r in path)
    out = tmp_path / "ls"
    experiment(
        "linesearch",
        out,
        f"--data_dir={mnist_dir}",
        "--widths=16",
        "--draws=2",
        "--lrs=0.01,1",
        *ANY_RUN,
    )
    rows = table(out / "linesearch.csv")
    assert [(r["rule"], r["lr"]) for r in rows] == [
        ("sgd", "0.01"),
        ("np", "0.01"),
        ("sgd", "1.0"),
        ("np", "1.0"),
    ]
    assert all(r["delta_loss"] != "" for r in rows)


def test_scaling(tmp_path, mnist_dir):
    out = tmp_path / "scale"
    experiment(
        "scaling", out, f"--data_dir={mnist_dir}", "--widths=8,16", "--depths=2", "--lrs=1.0"
    )
    summary = table(out / "scaling.csv")
    assert [(r["sweep"], r["hl_size"] or r["n_hl"]) for r in summary] == [
        ("width", "8"),
        ("width", "16"),
        ("depth", "2"),
    ]
    assert all(r["largest_stable_lr"] == "1.0" for r in summary)
    assert_png(out / "scaling.png")


def test_bad_input_is_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "nodepert_dist.experiments",
        "scaling",
        f"--out={tmp_path}",
        "--widths=8,x",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV, cwd=REPO)
    assert (
        proc.returncode != 0
        and proc.stderr.strip().splitlines()[-1] == "error: --widths must be integers"
    )
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "nodepert_dist.experiments", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        cwd=REPO,
    )
    assert proc.returncode != 0 and "unknown experiment 'nope'" in proc.stderr
