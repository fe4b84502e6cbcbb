"""One way to build a run from its settings: `build(cfg, mesh)`.

Data and splits, the preprocessing (mode, statistics of the training split, device function),
the model, the optimizer with every aid, the initial replicated state, the train and eval steps,
the steps per epoch and the eval batch. `train.run` trains what it returns; the experiments
(restoring a checkpoint, probing the estimator, replaying) and the benchmarks build from it too,
so nothing here exists twice and a probe measures exactly what the run trains with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from nodepert_dist import (
    checkpoint_layout,
    checkpoint_restore,
    decorrelation,
    loop_step,
    models,
    population,
    taps,
)
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.config import Config
from nodepert_dist.data import pipeline, preprocess, store


@dataclasses.dataclass
class Run:
    cfg: Config  # resolved (sigma filled in)
    mesh: Any
    data: store.Stored
    splits: dict  # {"train": (lo, hi), "val": (lo, hi)} rows of data.train_*
    steps_per_epoch: int
    prep_mode: str  # the resolved --preprocess
    prep: Callable  # jitted uint8 -> float32 on the device, sharded like the batch
    model: Any
    optimizer: optax.GradientTransformation
    state: step_lib.TrainState  # the initial state (seed's parameters), replicated
    train_step: Callable  # the step on its own (probes, benchmarks)
    loop: loop_step.LoopStep  # the train loop's call: preprocessing, step(s), metric log
    eval_step: Callable  # on the uint8 batch: the preprocessing inside
    eval_batch: int  # --eval_batchsize rounded up to a multiple of the devices

    def gradient(self, global_batch: int, update_rule: str | None = None):
        """The run's local gradient (`step.local_gradient` of its settings) for a batch of
        `global_batch` examples; `update_rule="np"`: its NP estimator even for an SGD run."""
        cfg = self.cfg
        return step_lib.local_gradient(
            update_rule=update_rule or cfg.update_rule,
            loss=cfg.loss,
            seed=cfg.seed,
            global_batch=global_batch,
            np=cfg.np,
        )

    def restore(self, step: int) -> step_lib.TrainState:
        """The run's checkpoint at `step` (of cfg.workdir), on this run's optimizer."""
        path = checkpoint_layout.step_dir(os.path.join(self.cfg.workdir, "checkpoints"), step)
        if not os.path.isdir(path):
            raise ValueError(f"no checkpoint of step {step} in {self.cfg.workdir}/checkpoints")
        return checkpoint_restore.load(path, self.state)[0]


def check_mesh(cfg: Config, mesh) -> None:
    """One line if cfg's batch does not split over the mesh's data axis, or its members over
    the member axis (before any work)."""
    groups, n = mesh.shape[mesh_lib.MEMBER], len(population.members(cfg))
    if n % groups:
        raise ValueError(
            f"the mesh has {groups} member groups but the run has {n} member(s); build the "
            "mesh with population.placement(cfg) groups (mesh.make_mesh)"
        )
    mesh_lib.check_batch(cfg.batchsize, mesh)
    per_device = cfg.batchsize // mesh_lib.data_size(mesh)
    if cfg.update_rule == "np" and per_device % cfg.np_microbatches:
        raise ValueError(
            f"--np_microbatches={cfg.np_microbatches} does not divide the "
            f"{per_device} examples per device; use a divisor of {per_device}"
        )


def make_train_step(cfg: Config, model, mesh, steps_per_epoch: int, jit: bool = True):
    """(optimizer, jitted train step) of cfg's update rule: the run's own, or a population's
    (its members' settings traced in one step; the optimizer is the structure their
    stacked states share). `jit=False`: the step not yet jitted (step.sharded_train_step)."""
    member_rule = population.rule(cfg, steps_per_epoch)
    optimizer = member_rule({})[1]
    make = step_lib.make_train_step if jit else step_lib.sharded_train_step
    train_step = make(
        model,
        optimizer,
        mesh,
        update_rule=cfg.update_rule,
        loss=cfg.loss,
        seed=cfg.seed,
        global_batch=cfg.batchsize,
        np=cfg.np,
        decorrelate_lr=cfg.decorrelate_lr,
        **(dict(members=population.values(cfg), member_rule=member_rule) if cfg.population else {}),
    )
    return optimizer, train_step


def build(cfg: Config, mesh) -> Run:
    """The run `cfg` describes, on `mesh` (cfg validated; sigma resolved here)."""
    cfg = cfg.resolved()
    check_mesh(cfg, mesh)
    data, splits, steps_per_epoch = pipeline.open_splits(cfg.data, cfg.batchsize)
    # the preprocessing runs per batch on the device, from training-split statistics
    prep_mode = preprocess.resolve(cfg.preprocess, cfg.dataset)
    stats = preprocess.statistics(data.root, data.train_x, prep_mode, *splits["train"])
    prep = preprocess.device_fn(prep_mode, stats, mesh)
    sample_x = np.zeros((1, *data.train_x.shape[1:]), np.float32)
    model = models.build(
        cfg.model, data.num_classes, local_heads=cfg.np_local, decorrelate=cfg.decorrelate
    )
    prep_parts = preprocess.device_parts(prep_mode, stats, mesh)
    optimizer, sharded_step = make_train_step(cfg, model, mesh, steps_per_epoch, jit=False)
    loop = loop_step.make(
        sharded_step,
        prep_parts,
        mesh,
        rows=loop_step.log_rows(cfg.metrics_every, cfg.steps_per_call),
        members=len(population.members(cfg)) if cfg.population else 0,
        steps_per_call=cfg.steps_per_call,
    )
    state = population.init_state(cfg, model, optimizer, sample_x, mesh)
    first = jax.tree.map(lambda a: a[0], state) if cfg.population else state  # one member
    taps.check(
        decorrelation.bind(model, first.decor),
        first.params,
        sample_x,
        needs_taps=cfg.update_rule == "np",
    )
    eval_step = step_lib.make_eval_step(
        model, mesh, loss=cfg.loss, population=bool(cfg.population), prep=prep_parts
    )
    return Run(
        cfg=cfg,
        mesh=mesh,
        data=data,
        splits=splits,
        steps_per_epoch=steps_per_epoch,
        prep_mode=prep_mode,
        prep=prep,
        model=model,
        optimizer=optimizer,
        state=state,
        train_step=step_lib.jit_train_step(sharded_step),
        loop=loop,
        eval_step=eval_step,
        eval_batch=mesh_lib.round_up_batch(cfg.eval_batchsize, mesh),
    )
