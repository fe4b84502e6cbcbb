"""The train loop's compiled call (loop_step.py) and its metric reads (loop_metrics.py): the
preprocessing inside the step, K steps per call and metrics read every N steps change no bit of
the state, the metrics or the epoch rows; a non-finite loss read late stops at its own step and
nothing after it is saved."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import (
    checkpoint_layout,
    crash_guard,
    loop_metrics,
    loop_step,
    population,
    preempt,
    run_record,
    run_setup,
    train,
)
from nodepert_dist import mesh as mesh_lib

TIMING = ("epoch_time", "examples_per_s")
# 1000 training examples: 10 steps of 96 an epoch (8 devices)
TINY = dict(
    n_hl=1, hl_size=16, batchsize=96, validation_size=59000, eval_train=False, eval_batchsize=4000
)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _bits(tree):
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(jax.device_get(tree))]


def _batches(built, n, k=1):
    """n global batches of the run's training data (uint8), one by one or stacked k at a time."""
    x, y = (
        built.data.train_x[: n * built.cfg.batchsize],
        built.data.train_y[: n * built.cfg.batchsize],
    )
    x = x.reshape(n // k, k, built.cfg.batchsize, *x.shape[1:])
    y = y.reshape(n // k, k, built.cfg.batchsize)
    if k == 1:
        return [mesh_lib.global_batch(built.mesh, a[0], b[0]) for a, b in zip(x, y)]
    return [mesh_lib.global_batch(built.mesh, a, b, stacked=True) for a, b in zip(x, y)]


def _build(mnist_dir, **kw):
    cfg = train.Config(**{**TINY, "data_dir": mnist_dir, "update_rule": "np", **kw})
    return run_setup.build(cfg, mesh_lib.make_mesh())


@pytest.mark.parametrize("prep", ["standardize", "zca"])
def test_preprocessing_inside_the_step_is_bitwise_the_separate_call(mnist_dir, prep):
    """float32 on 8 CPU devices: 3 steps of the loop's call (preprocessing traced into the step)
    leave the state and metrics of 3 steps fed by the separately compiled preprocessing."""
    built = _build(mnist_dir, preprocess=prep)
    before, after, log = _copy(built.state), _copy(built.state), built.loop.new_log()
    for x, y in _batches(built, 3):
        before, m_before = built.train_step(before, built.prep(x), y)
        after, log, m_after = built.loop.call(after, log, x, y)
        assert _bits(m_before) == _bits(m_after)
    assert _bits(before) == _bits(after)


def test_k_steps_per_call_are_bitwise_k_calls(mnist_dir):
    """--steps_per_call=4: 8 steps as 2 scanned calls give the state, per-step metrics and log of
    8 single calls, with zca's matmul in the preprocessing and for a population (its member
    map runs inside the scan)."""
    for kw in ({"preprocess": "zca"}, {"population": "lr:0.01,0.02"}):
        built = _build(mnist_dir, steps_per_call=4, metrics_every=8, **kw)
        one, log_one = _copy(built.state), built.loop.new_log()
        ms = []
        for x, y in _batches(built, 8):
            one, log_one, m = built.loop.call(one, log_one, x, y)
            ms.append(m)
        four, log_four = _copy(built.state), built.loop.new_log()
        chunks = []
        for xs, ys in _batches(built, 8, k=4):
            four, log_four, m = built.loop.call(four, log_four, xs, ys)
            chunks.append(m)
        assert _bits(one) == _bits(four)
        assert _bits(log_one) == _bits(log_four)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *ms)
        assert _bits(stacked) == _bits(jax.tree.map(lambda *a: jnp.concatenate(a), *chunks))
        assert int(np.asarray(four.step).reshape(-1)[0]) == 8


def test_an_epochs_tail_is_one_call_of_its_size():
    """K=16: an epoch of 58 steps is 3 calls of 16 and one of 10 (not 10 single-step calls);
    a boundary (--max_steps, a step checkpoint) closer than the tail leaves single steps."""
    loop = loop_step.LoopStep(None, None, None, rows=1, steps_per_call=16)
    assert loop.call_sizes(0, 58) == [16, 16, 16, 10]
    assert loop.call_sizes(0, 468) == [16] * 29 + [4]
    assert loop.call_sizes(50, 58) == [1] * 8  # resumed inside the epoch: 8 < the tail
    assert loop.call_sizes(0, 32) == [16, 16]
    assert loop.call_size(room=12, n_steps=58) == 10 and loop.call_size(9, 58) == 1
    assert loop_step.LoopStep(None, None, None, 1, 1).call_sizes(0, 3) == [1, 1, 1]


def _rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow  # four short trainings
def test_metrics_every_and_steps_per_call_change_no_row_nor_checkpoint(
    tmp_path, mnist_dir, monkeypatch
):
    """Epochs of 10 steps, --max_steps=17 and a checkpoint every 6 steps, none of them a
    multiple of K=4 or N=4 (K=4 runs steps 1-4, 5-6 (the epoch's tail size, 10 % 4, where 2
    steps are left before the checkpoint), 7-10, 11-12, 13-16, 17): the rows, every
    checkpoint's loop record and the final parameters are those of one step per call, read
    every step."""
    calls = []  # steps per training call
    global_batch = mesh_lib.global_batch

    def spy(mesh, x, *args, stacked=False):
        if x.shape[-4] == TINY["batchsize"]:  # not an evaluation batch (4000)
            calls.append(len(x) if stacked else 1)
        return global_batch(mesh, x, *args, stacked=stacked)

    monkeypatch.setattr(mesh_lib, "global_batch", spy)
    runs = {}
    for name, kw in {
        "every_step": dict(metrics_every=1, steps_per_call=1),
        "n4": dict(metrics_every=4),
        "k4": dict(metrics_every=4, steps_per_call=4),
        "k4_n50": dict(steps_per_call=4),
    }.items():
        workdir = str(tmp_path / name)
        cfg = train.Config(
            **{
                **TINY,
                "data_dir": mnist_dir,
                "workdir": workdir,
                "num_epochs": 3,
                "max_steps": 17,
                "checkpoint_every_steps": 6,
                "keep_checkpoints": 0,
                "save_final_params": workdir + "/final.npz",
                **kw,
            }
        )
        calls.clear()
        train.run(cfg)
        assert calls == ([4, 2, 4, 2, 4, 1] if "k4" in name else [1] * 17), name
        ckpts = os.path.join(workdir, "checkpoints")
        saved = {}
        for s in checkpoint_layout.committed_steps(ckpts):
            loop = checkpoint_layout.read_manifest(checkpoint_layout.step_dir(ckpts, s))["loop"]
            saved[s] = {k: v for k, v in loop.items() if k != "elapsed"}
            saved[s]["rows"] = [
                {k: v for k, v in r.items() if k not in TIMING} for r in loop["rows"]
            ]
        with np.load(workdir + "/final.npz") as final:
            params = {k: final[k].tobytes() for k in final.files}
        runs[name] = (_rows(workdir), saved, params)
    reference = runs.pop("every_step")
    assert sorted(reference[1]) == [6, 10, 12, 17]
    for name, got in runs.items():
        assert got == reference, name


def test_a_non_finite_loss_read_late_stops_at_its_step_and_nothing_after_it_is_saved(
    tmp_path, mnist_dir
):
    """SGD at lr 1e6 turns the loss infinite at step 5. Read every 50 steps with a checkpoint
    every 2, the run stops at the save of step 6 (a read first) with the message of a run that
    reads every step: checkpoints 2 and 4 only, both finite."""
    from test_crash_guard import BLOWS_UP

    messages = {}
    for every in (1, 50):
        workdir = str(tmp_path / f"every{every}")
        cfg = train.Config(
            **{
                **BLOWS_UP,
                "crash_guard": False,
                "data_dir": mnist_dir,
                "workdir": workdir,
                "metrics_every": every,
                "checkpoint_every_steps": 2,
            }
        )
        with pytest.raises(crash_guard.Diverged) as e:
            train.run(cfg)
        messages[every] = str(e.value)
        assert checkpoint_layout.committed_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
    assert messages[50] == messages[1]
    assert "is inf at step 5 (epoch 1)" in messages[1]


def test_reading_rows_adds_them_in_step_order_and_stops_at_the_first_non_finite():
    rng = np.random.default_rng(0)
    values = rng.normal(size=7).astype(np.float32).astype(np.float64)
    one = {"loss_sum": 0.0, "correct": 0.0, "last_loss": np.nan}
    for v in values:  # what the loop did reading each step
        one["loss_sum"] = one["loss_sum"] + v
    many = {"loss_sum": 0.0, "correct": 0.0, "last_loss": np.nan}
    rows = {"loss_sum": values, "correct": np.ones(7), "count": np.full(7, 2.0)}
    loop_metrics.add(many, rows, 1, 1)
    assert many["loss_sum"] == one["loss_sum"] and many["correct"] == 7.0
    assert many["last_loss"] == values[-1] / 2
    rows["loss_sum"] = np.array([1.0, 2.0, np.nan, np.inf])
    with pytest.raises(crash_guard.Diverged, match=r"is nan at step 12 \(epoch 3\)"):
        loop_metrics.add(many, {**rows, "correct": np.ones(4), "count": np.ones(4)}, 10, 3)


def test_a_population_read_late_freezes_and_reports_each_member_at_its_own_step(tmp_path):
    """Rows of steps 4..6 for 3 members: member 1 diverges at step 5, member 0 at 6. Events name
    those steps, frozen members add nothing from their step on; all diverged stops the run."""
    cfg = train.Config(population="lr:0.1,0.2,0.3", workdir=str(tmp_path))
    watch = population.Watch(cfg, types.SimpleNamespace(alive=np.ones(3, bool)))
    nan = np.nan
    rows = {
        "loss_sum": np.array([[1.0, 2.0, 3.0], [1.0, nan, 3.0], [nan, nan, 3.0]]),
        "correct": np.ones((3, 3)),
        "count": np.ones((3, 3)),
        "alive": np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1]], float),
    }
    sums = {"loss_sum": 0.0, "correct": 0.0, "last_loss": nan}
    loop_metrics.add(sums, rows, 4, 1, watch)
    events = [(r["event"], r["member"], r["step"]) for r in run_record.read_metrics(str(tmp_path))]
    assert events == [("member_diverged", 1, 5), ("member_diverged", 0, 6)]
    assert sums["loss_sum"].tolist() == [2.0, 2.0, 9.0]
    assert sums["correct"].tolist() == [2.0, 1.0, 3.0]
    last = {**rows, "loss_sum": np.array([[nan, nan, nan]]), "alive": np.zeros((1, 3))}
    last = {k: v[:1] for k, v in last.items()}
    with pytest.raises(crash_guard.Diverged, match="the last at step 7"):
        loop_metrics.add(sums, last, 7, 1, watch)


def test_the_preemption_check_sees_a_multiple_of_n_passed_inside_a_call():
    watcher = preempt.Watcher(check_every=5)
    watcher.signal = 15
    assert watcher.stop_now(10) and not watcher.stop_now(9)
    assert watcher.stop_now(12, since=8)  # steps 9..12 include 10
    assert not watcher.stop_now(14, since=10)  # 11..14: no multiple of 5


def test_k_steps_per_call_refuse_a_hook_that_looks_at_every_step(tmp_path, mnist_dir):
    class EveryStep:
        def after_step(self, *args):
            pass

    cfg = train.Config(**TINY, data_dir=mnist_dir, workdir=str(tmp_path), steps_per_call=2)
    with pytest.raises(
        ValueError, match="--steps_per_call=2: this measurement looks at every step"
    ):
        train.run(cfg, hooks=[EveryStep()])
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # refused before any work
