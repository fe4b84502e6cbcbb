"""Resuming with changed settings: config.RESUME_RULES, each row checked by a real resume, and
what a resume does with optimizer parts, the cosine schedule's horizon and the data order.

One tiny run (fc 784-8-10, 1000-example batches over 4000 training examples: 4 steps an epoch,
8 devices in this process) is cut mid-epoch (step 2) and at an epoch boundary (step 4); every
case resumes a copy of one of those workdirs in this process.
"""

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from test_checkpoint import saved_arrays

from nodepert_dist import checkpoint, checkpoint_layout, optim, train
from nodepert_dist import config as config_lib
from nodepert_dist.config import Config

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

MID, BOUNDARY = 2, 4  # the two checkpoints' steps: inside epoch 1, and epoch 2's start


def _base(data_dir, workdir) -> Config:
    return Config(
        network="fc",
        n_hl=1,
        hl_size=8,
        batchsize=1000,
        validation_size=56000,
        eval_batchsize=8000,
        eval_train=False,
        num_epochs=2,
        lr=0.05,
        sigma=3e-2,
        checkpoint_every_steps=2,
        data_dir=data_dir,
        workdir=str(workdir),
    )


@pytest.fixture(scope="module")
def cuts(mnist_dir, tmp_path_factory):
    """{MID: workdir, BOUNDARY: workdir} of the base run cut at those steps, and its
    "data_dir"."""
    root = tmp_path_factory.mktemp("cuts")
    run = _base(mnist_dir, root / "run")
    train.run(dataclasses.replace(run, max_steps=MID))
    shutil.copytree(root / "run", root / "mid")
    train.run(dataclasses.replace(run, max_steps=BOUNDARY))
    cut = {MID: root / "mid", BOUNDARY: root / "run", "data_dir": mnist_dir}
    for name, settings in VARIANTS.items():  # cut at MID only
        cut[name] = root / name
        train.run(dataclasses.replace(run, max_steps=MID, workdir=str(cut[name]), **settings))
    return cut


class StateAtStart:
    """Hook: the train state the run starts (or resumes) with."""

    def start(self, ctx):
        self.state = jax.device_get(ctx.state)


# Base runs with other settings, for settings that only apply with them ("variant_" below).
VARIANTS = {"decorrelated": dict(decorrelate=True), "population": dict(population="lr:0.05,0.1")}


def _resume(cuts, at, tmp_path, hooks=(), **changes):
    """A copy of the run cut at step `at` (of the base run or of its `variant_`), and a function
    resuming it with `changes` for one more step (or as --max_steps says)."""
    workdir = tmp_path / "resumed"
    variant = changes.pop("variant_", None)
    shutil.copytree(cuts[variant] if variant else cuts[at], workdir)
    data_dir = changes.pop("data_dir_", None) or cuts["data_dir"]
    cfg = dataclasses.replace(
        _base(data_dir, workdir), **{"max_steps": at + 1, **VARIANTS.get(variant, {}), **changes}
    )
    return workdir, cfg, lambda: train.run(cfg, hooks=hooks)


def _listing(workdir):
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if ".lock" not in p.name)


# A changed value for every setting (with what it needs to be valid), by rule.
CHANGES = {
    "data_dir": dict(data_dir_="SYMLINK"),
    "data_workers": dict(data_workers=1),
    "num_epochs": dict(num_epochs=3),
    "max_steps": dict(max_steps=MID),
    "crash_guard": dict(crash_guard=True),
    "crash_points": dict(crash_points=10.0),
    "crash_lr_factor": dict(crash_lr_factor=0.25),
    "crash_max_rollbacks": dict(crash_max_rollbacks=1),
    "np_mode": dict(np_mode="regen"),
    "np_microbatches": dict(np_microbatches=5),
    "eval_batchsize": dict(eval_batchsize=1000),
    "eval_train": dict(eval_train=True),
    "checkpoint_every_steps": dict(checkpoint_every_steps=1),
    "checkpoint_every_epochs": dict(checkpoint_every_epochs=2),
    "keep_checkpoints": dict(keep_checkpoints=1),
    "keep_checkpoint_every_steps": dict(keep_checkpoint_every_steps=2),
    "save_final_params": dict(save_final_params="FINAL"),
    "preemption_check_steps": dict(preemption_check_steps=2),
    "data_on_device": dict(data_on_device=True),
    "metrics_every": dict(metrics_every=3),
    "steps_per_call": dict(steps_per_call=2),
    "hang_timeout_s": dict(hang_timeout_s=600.0),
    # saved on member=2 x data=4 (the default for 2 members), restored resharded onto 1 x 8
    "member_devices": dict(variant_="population", member_devices=1),
    "preprocess": dict(preprocess="unit"),
    "dtype": dict(dtype="bfloat16"),
    "precision": dict(precision="default"),
    "update_rule": dict(update_rule="sgd"),
    "lr": dict(lr=0.1),
    "wd": dict(wd=1e-3),
    "optimizer": dict(optimizer="adam"),
    "lr_schedule": dict(lr_schedule="cosine"),
    "warmup_epochs": dict(warmup_epochs=0.5),
    "lr_decay_epochs": dict(lr_schedule="step", lr_decay_epochs=1),
    "lr_decay_factor": dict(lr_schedule="step", lr_decay_epochs=1, lr_decay_factor=0.5),
    "clip_norm": dict(clip_norm=1.0),
    "weight_norm": dict(weight_norm=True),
    "loss": dict(loss="ce"),
    "sigma": dict(sigma=5e-2),
    "noise": dict(noise="gaussian"),
    "np_antithetic": dict(np_antithetic=True),
    "np_draws": dict(np_draws=2),
    "np_delta": dict(np_delta="jvp"),
    "np_layerwise": dict(np_layerwise=True),
    "np_estimator": dict(np_estimator="original"),
    "np_local": dict(np_local=True),
    "decorrelate": dict(decorrelate=True),
    "decorrelate_lr": dict(variant_="decorrelated", decorrelate_lr=1e-3),
    "seed": dict(seed=1),
    "augment": dict(augment=True),
    "dataset": dict(dataset="fashion_mnist"),
    "validation_size": dict(validation_size=55000),
    "cifar100_labels": dict(cifar100_labels="coarse"),
    "batchsize": dict(batchsize=2000),
    "network": dict(network="linfc"),
    "n_hl": dict(n_hl=2),
    "hl_size": dict(hl_size=16),
    "width": dict(width=32),
    "norm": dict(norm="group"),
    "population": dict(population="lr:0.01,0.02"),
    "lr_schedule_epochs": dict(lr_schedule="cosine", lr_schedule_epochs=4),
}
# Settings the resumed state depends on (optimizer parts, lr, batches): their cases train a step.
STEPPED = (
    "wd",
    "optimizer",
    "clip_norm",
    "weight_norm",
    "lr",
    "lr_schedule",
    "warmup_epochs",
    "lr_decay_epochs",
    "lr_decay_factor",
    "lr_schedule_epochs",
    "seed",
    "augment",
)
# They choose whether and where a run resumes: not a resume with a changed setting.
NOT_RESUMES = ("workdir", "resume")


def test_every_setting_has_one_resume_rule_and_a_case_here():
    names = [f.name for f in dataclasses.fields(Config)]
    rows = [n for ns in config_lib.RESUME_RULES.values() for n in ns]
    assert sorted(rows) == sorted(names)  # each setting exactly once
    assert sorted([*CHANGES, *NOT_RESUMES]) == sorted(names)


def _rule_cases():
    for name, rule in config_lib.RESUME_RULE.items():
        if name in NOT_RESUMES:
            continue
        for at in (MID, BOUNDARY) if rule == "epoch" else (MID,):
            yield pytest.param(name, rule, at, id=f"{rule}-{name}-{at}")


@pytest.mark.parametrize("name,rule,at", list(_rule_cases()))
def test_resume_with_a_changed_setting_does_what_the_table_says(
    cuts, tmp_path, caplog, name, rule, at
):
    changes = dict(CHANGES[name])
    if changes.get("data_dir_") == "SYMLINK":
        os.symlink(cuts["data_dir"], tmp_path / "same_data")
        changes["data_dir_"] = str(tmp_path / "same_data")
    if changes.get("save_final_params") == "FINAL":
        changes["save_final_params"] = str(tmp_path / "final.npz")
    if name not in STEPPED:  # restore, check and stop; no step to compile
        changes.setdefault("max_steps", at)
    workdir, cfg, run = _resume(cuts, at, tmp_path, **changes)
    before = _listing(workdir)
    caplog.set_level(logging.WARNING)
    refused = rule == "refuse" or (rule == "epoch" and at == MID)
    if refused:
        with pytest.raises(ValueError) as e:
            run()
        line = str(e.value)
        assert f"--{name}=" in line and "\n" not in line
        assert "opt_state" not in line and "params." not in line
        assert _listing(workdir) == before  # refused before any work
        return
    rows, _ = run()
    logged = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "changed settings" in r.getMessage()
    )
    if rule == "free":
        assert logged == ""  # silently
    else:
        assert f"--{name}: " in logged
    assert rows[-1]["step"] <= at  # the resumed rows: no epoch ended
    assert checkpoint_layout.committed_steps(str(workdir / "checkpoints"))[-1] == cfg.max_steps


# ----------------------------------------------------------------------------- optimizer parts


@pytest.mark.parametrize(
    "changes,kept,fresh",
    [
        (dict(optimizer="adam", wd=1e-3), [], ["adam", "decay"]),
        (dict(warmup_epochs=0.5, lr_schedule="cosine"), ["sgd"], []),
        (dict(weight_norm=True, clip_norm=1.0), ["sgd"], ["clip", "weight_norm"]),
    ],
    ids=["adam+wd", "warmup+cosine", "weight_norm+clip"],
)
def test_resume_carries_optimizer_state_onto_new_parts(cuts, tmp_path, changes, kept, fresh):
    """Each optimizer change the table allows resumes (main: "has no array 'opt_state.0.0.count'"
    or "... that this model lacks"): the parameters and shared parts are the checkpoint's, new
    parts start fresh, and the run trains on."""
    hook = StateAtStart()
    workdir, cfg, run = _resume(cuts, MID, tmp_path, hooks=(hook,), **changes)
    saved = saved_arrays(checkpoint_layout.step_dir(str(cuts[MID] / "checkpoints"), MID))
    rows, note = run()
    assert "stopped at --max_steps=3" in note
    state = hook.state
    assert int(state.step) == MID
    for layer in ("layer0", "layer1"):
        np.testing.assert_array_equal(
            state.params[layer]["kernel"], saved[f"params.{layer}.kernel"]
        )
    names = [
        n
        for n, _ in optim.optimizer_parts(
            cfg.optimizer, cfg.lr, cfg.wd, clip_norm=cfg.clip_norm, weight_norm=cfg.weight_norm
        )
    ]
    assert sorted(names) == sorted(kept + fresh)
    parts = optim.part_states(names, state.opt_state)
    if "weight_norm" in fresh:  # fresh norms: the kernels' norms at the resume step
        np.testing.assert_allclose(
            parts["weight_norm"].norms["layer0"]["kernel"],
            np.linalg.norm(saved["params.layer0.kernel"]),
            rtol=1e-6,
        )
    if "adam" in fresh:
        assert int(parts["adam"][0].count) == 0
        assert not any(np.any(m) for m in jax.tree.leaves(parts["adam"][0].mu))
    assert checkpoint_layout.committed_steps(str(workdir / "checkpoints"))[-1] == MID + 1


# ----------------------------------------------------------------------------- lr schedule horizon


def test_num_epochs_on_resume_keeps_the_cosine_horizon(tmp_path, mnist_dir, caplog):
    """--num_epochs never moves the cosine curve (main recomputed it over the new total): the
    horizon is recorded at the first start and kept; going past it is refused (one line) unless
    --lr_schedule_epochs is given with it."""
    cosine = dataclasses.replace(_base(mnist_dir, tmp_path / "cut"), lr_schedule="cosine")
    untimed = lambda rs: [
        {k: v for k, v in r.items() if k not in ("epoch_time", "examples_per_s")} for r in rs
    ]
    train.run(dataclasses.replace(cosine, max_steps=MID))  # horizon: its 2 epochs
    # Past it: refused before any work, naming the flag to give.
    with pytest.raises(
        ValueError,
        match=r"--num_epochs=3 goes past the cosine schedule's 2 "
        r"epochs.*--lr_schedule_epochs=3",
    ):
        train.run(dataclasses.replace(cosine, num_epochs=3))
    # Lowering it keeps the curve: the run is the uninterrupted 2-epoch run's first epoch.
    rows, note = train.run(dataclasses.replace(cosine, num_epochs=1))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["lr_schedule_epochs"] == 2
    whole = train.run(dataclasses.replace(cosine, workdir=str(tmp_path / "whole")))[0]
    assert untimed(rows) == untimed(whole[:2])
    # Finished: the hint says how far --num_epochs goes on this curve.
    assert (
        "raise --num_epochs, up to 2, to train on along the same cosine"
        in train.run(dataclasses.replace(cosine, num_epochs=1))[1]
    )
    # With the horizon given: allowed, recomputed over it from here.
    caplog.set_level(logging.WARNING)
    rows, _ = train.run(dataclasses.replace(cosine, num_epochs=3, lr_schedule_epochs=3))
    assert rows[-1]["epoch"] == 3
    # at step 4: half-way along 8 steps (0.025), a third of the way along 12 (0.0375)
    assert "the lr at step 4 changes from 0.025 to 0.0375" in caplog.text
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["lr_schedule_epochs"] == 3
    note = train.run(dataclasses.replace(cosine, num_epochs=3))[1]  # 3 kept, not given again
    assert "raise --num_epochs and --lr_schedule_epochs together" in note


# ----------------------------------------------------------------------------- data order


@pytest.mark.parametrize("changes", [dict(seed=1), dict(augment=True)], ids=["seed", "augment"])
def test_settings_of_the_data_order_change_only_at_an_epoch_boundary(cuts, tmp_path, changes):
    """main only warned: a mid-epoch resume with another seed repeats and skips examples."""
    (name,) = changes
    _, _, run = _resume(cuts, MID, tmp_path / "mid", **changes)
    with pytest.raises(ValueError, match=f"stopped mid-epoch under --{name}=.*--{name}="):
        run()
    _, _, run = _resume(cuts, BOUNDARY, tmp_path / "boundary", **changes)
    rows, note = run()
    assert "stopped at --max_steps=5" in note


def test_readme_table_lists_the_rules():
    """The docs' resume table names each setting under its rule ("free" may abbreviate)."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / "design" / "checkpoints.md").read_text()
    for rule, names in config_lib.RESUME_RULES.items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {rule} | `--")]
        listed = set(re.findall(r"`--(\w+)`", row.split("|")[2]))
        assert listed <= set(names) and (rule == "free" or listed == set(names)), rule


def test_experiments_read_a_checkpoint_of_a_run_with_training_aids(cuts, tmp_path):
    """experiments' load_point built the optimizer from --optimizer/--lr/--wd only: a run with
    --weight_norm or --clip_norm failed with "has no array 'opt_state...'"."""
    from nodepert_dist.experiments import common

    workdir, cfg, run = _resume(cuts, MID, tmp_path, weight_norm=True, clip_norm=1.0)
    run()
    _, _, params = common.load_point(cfg, MID + 1)
    saved = saved_arrays(checkpoint_layout.step_dir(str(workdir / "checkpoints"), MID + 1))
    np.testing.assert_array_equal(params["layer0"]["kernel"], saved["params.layer0.kernel"])


def test_experiments_read_a_checkpoint_of_a_decorrelated_run(cuts, tmp_path):
    """load_point built the model without --decorrelate's matrices ("collection
    'decorrelation' is empty"): its model now applies them as they were saved."""
    import jax.numpy as jnp

    from nodepert_dist import models
    from nodepert_dist.experiments import common

    workdir, cfg, _ = _resume(cuts, MID, tmp_path, variant_="decorrelated")
    _, model, params = common.load_point(cfg, MID)
    saved = saved_arrays(checkpoint_layout.step_dir(str(workdir / "checkpoints"), MID))
    x = jnp.ones((2, 28, 28, 1))
    plain = models.build_model("fc", 10, 1, 8, decorrelate=True)
    want = plain.apply(
        {
            "params": params,
            "decorrelation": {k: {"R": saved[f"decor.{k}.R"]} for k in ("decor0", "decor1")},
        },
        x,
    )
    np.testing.assert_array_equal(model.apply({"params": params}, x), want)
    assert not np.array_equal(saved["decor.decor0.R"], np.eye(784))  # R learned


def test_a_checkpoint_with_optax_schedule_counter_still_resumes(tmp_path, mnist_dir):
    """Checkpoints of the previous version kept optax's schedule counter (`opt_state.1.count`)
    for a cosine or warm-up run; they resume onto the step-driven schedule exactly."""
    import jax.numpy as jnp
    import optax

    from nodepert_dist import mesh as mesh_lib

    cosine = dataclasses.replace(_base(mnist_dir, tmp_path / "new"), lr_schedule="cosine")
    train.run(dataclasses.replace(cosine, max_steps=MID))
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "checkpoints")
    hook = StateAtStart()  # the state as restored, written back with the old layout
    train.run(dataclasses.replace(cosine, max_steps=MID), hooks=(hook,))
    manifest = json.loads(
        (tmp_path / "new" / "checkpoints" / f"step_{MID:08d}" / "manifest.json").read_text()
    )
    old_state = hook.state.replace(
        opt_state=(
            optax.EmptyState(),
            optax.ScaleByScheduleState(count=jnp.asarray(MID, jnp.int32)),
        )
    )
    saver = checkpoint.Checkpointer(str(tmp_path / "old" / "checkpoints"))
    saver.save(
        MID,
        jax.device_put(old_state, mesh_lib.replicated(mesh_lib.make_mesh())),
        meta={k: manifest[k] for k in ("epoch", "config", "rng", "loop")},
        position=manifest["processes"][0]["position"],
    )
    saver.wait()
    assert "opt_state.1.count" in saved_arrays(
        checkpoint_layout.step_dir(str(tmp_path / "old" / "checkpoints"), MID)
    )
    untimed = lambda rs: [
        {k: v for k, v in r.items() if k not in ("epoch_time", "examples_per_s")} for r in rs
    ]
    old = train.run(dataclasses.replace(cosine, workdir=str(tmp_path / "old")))[0]
    assert untimed(old) == untimed(train.run(cosine)[0])
