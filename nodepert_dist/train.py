"""`nodepert-train`: node perturbation (or SGD) on a device mesh, epoch by epoch.

Sections: config -> mesh -> data -> model and state -> steps -> epoch 0 -> train loop.
Every process runs this same program; process 0 alone writes files and prints progress.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Optional

import jax
import numpy as np
from absl import app, flags, logging

from nodepert_dist import distributed, losses, metrics, models, perturbation
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.data import pipeline, sources

# Buffer donation is a no-op on CPU; the train step donates its state for GPU memory.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "mnist"
    network: str = "fc"
    update_rule: str = "np"
    n_hl: int = 2
    hl_size: int = 500
    lr: float = 1e-2
    batchsize: int = 100          # global, over all devices of all processes
    num_epochs: int = 10
    wd: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"
    loss: str = "mse"
    sigma: Optional[float] = None  # None: 1e-4 for fc/linfc, 1e-5 for conv nets
    noise: str = "gaussian"
    data_dir: str = "data"
    workdir: str = "runs/default"
    eval_batchsize: int = 1000
    eval_train: bool = True       # full-train-set accuracy every epoch (as the original code)
    save_final_params: str = ""   # if set: .npz of the final parameters (tests compare layouts)

    def resolved(self) -> "Config":
        sigma = self.sigma if self.sigma is not None else models.default_sigma(self.network)
        return dataclasses.replace(self, sigma=float(sigma))

    def validate(self) -> None:
        """One-line errors for bad settings, before anything is loaded or compiled."""
        choices = {"dataset": tuple(sources.DATASETS), "network": models.NETWORKS,
                   "update_rule": step_lib.UPDATE_RULES, "optimizer": step_lib.OPTIMIZERS,
                   "loss": losses.LOSSES, "noise": perturbation.NOISE_KINDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = {"lr": self.lr, "batchsize": self.batchsize, "eval_batchsize": self.eval_batchsize,
                    "hl_size": self.hl_size}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name}={value} must be positive")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"--sigma={self.sigma} must be positive")
        if self.num_epochs < 0 or self.n_hl < 0 or self.wd < 0:
            raise ValueError("--num_epochs, --n_hl and --wd must be >= 0")


# ----------------------------------------------------------------------------- helpers

def evaluate(eval_step, params, x, y, cfg: Config, mesh) -> tuple[float, float]:
    """(accuracy, mean loss) over a whole split, computed on the global batch."""
    totals = None
    for batch in pipeline.eval_batches(x, y, global_batch=cfg.eval_batchsize,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        out = eval_step(params, *mesh_lib.global_batch(mesh, *batch))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    totals = jax.device_get(totals)
    return float(totals["correct"] / totals["count"]), float(totals["loss_sum"] / totals["count"])


# ----------------------------------------------------------------------------- main loop

def train(cfg: Config) -> list[dict]:
    """Runs the whole training; returns the per-epoch metric rows (also written to the workdir)."""
    cfg.validate()
    cfg = cfg.resolved()

    # Mesh: one `data` axis over every device of every process.
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch(cfg.batchsize, mesh)
    mesh_lib.check_batch(cfg.eval_batchsize, mesh, "--eval_batchsize")
    logging.info("mesh: %d devices over %d processes (%s)", mesh.devices.size,
                 jax.process_count(), jax.devices()[0].platform)

    # Data: standardised with training-set statistics; each process gathers only its share.
    data = pipeline.standardize(sources.load(cfg.dataset, cfg.data_dir))
    n_steps = pipeline.steps_per_epoch(len(data.train_y), cfg.batchsize)
    if n_steps == 0:
        raise ValueError(f"--batchsize={cfg.batchsize} is larger than the {len(data.train_y)} "
                         f"training examples")

    # Model, optimizer and replicated train state.
    model = models.build_model(cfg.network, data.num_classes, cfg.n_hl, cfg.hl_size)
    optimizer = step_lib.make_optimizer(cfg.optimizer, cfg.lr, cfg.wd)
    state = step_lib.init_state(model, optimizer, data.train_x, cfg.seed, mesh)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("%s: %d parameters, sigma=%g, %d steps/epoch of %d examples",
                 cfg.network, n_params, cfg.sigma, n_steps, cfg.batchsize)

    # Steps.
    train_step = step_lib.make_train_step(
        model, optimizer, mesh, update_rule=cfg.update_rule, loss=cfg.loss, sigma=cfg.sigma,
        seed=cfg.seed, global_batch=cfg.batchsize, noise=cfg.noise)
    eval_step = step_lib.make_eval_step(model, mesh, loss=cfg.loss)
    writer = metrics.MetricsWriter(cfg.workdir, dataclasses.asdict(cfg))

    def epoch_row(epoch: int, extra: dict) -> dict:
        test_acc, test_loss = evaluate(eval_step, state.params, data.test_x, data.test_y, cfg, mesh)
        row = {"epoch": epoch, "step": int(jax.device_get(state.step)),
               "test_acc": test_acc, "test_loss": test_loss}
        if cfg.eval_train:
            row["train_acc"], row["train_loss"] = evaluate(
                eval_step, state.params, data.train_x, data.train_y, cfg, mesh)
        row.update(extra)
        writer.write(row)
        return row

    # Epoch 0: the untrained network.
    rows = [epoch_row(0, {})]

    # Train loop.
    for epoch in range(1, cfg.num_epochs + 1):
        batches = pipeline.train_batches(
            data.train_x, data.train_y, global_batch=cfg.batchsize, seed=cfg.seed, epoch=epoch,
            process_index=jax.process_index(), process_count=jax.process_count())
        progress = metrics.Progress(epoch, n_steps, cfg.batchsize)
        sums = None
        start = time.perf_counter()
        for i, (x, y) in enumerate(pipeline.iterate(batches)):
            state, m = train_step(state, *mesh_lib.global_batch(mesh, x, y))
            sums = m if sums is None else jax.tree.map(lambda a, b: a + b, sums, m)
            progress.update(i + 1, lambda: float(m["loss_sum"]) / cfg.batchsize)
        sums = jax.device_get(sums)
        epoch_time = time.perf_counter() - start
        mean_loss = float(sums["loss_sum"]) / (n_steps * cfg.batchsize)
        if not np.isfinite(mean_loss):
            logging.warning("epoch %d: the training loss is %s (diverged); lower --lr", epoch, mean_loss)
        rows.append(epoch_row(epoch, {
            "epoch_time": epoch_time, "mean_step_loss": mean_loss,
            "step_train_acc": float(sums["correct"]) / (n_steps * cfg.batchsize),
            "examples_per_s": n_steps * cfg.batchsize / epoch_time}))
    if cfg.save_final_params:
        distributed.save_params_npz(cfg.save_final_params, state.params)
    return rows


# ----------------------------------------------------------------------------- CLI

_DEFAULTS = Config()
flags.DEFINE_enum("dataset", _DEFAULTS.dataset, list(sources.DATASETS), "Dataset.")
flags.DEFINE_enum("network", _DEFAULTS.network, list(models.NETWORKS), "Architecture.")
flags.DEFINE_enum("update_rule", _DEFAULTS.update_rule, list(step_lib.UPDATE_RULES),
                  "np: node perturbation; sgd: backprop gradients.")
flags.DEFINE_integer("n_hl", _DEFAULTS.n_hl, "Hidden layers of fc/linfc.")
flags.DEFINE_integer("hl_size", _DEFAULTS.hl_size, "Units per hidden layer of fc/linfc.")
flags.DEFINE_float("lr", _DEFAULTS.lr, "Learning rate.")
flags.DEFINE_integer("batchsize", _DEFAULTS.batchsize, "Global batch size (all devices).")
flags.DEFINE_integer("num_epochs", _DEFAULTS.num_epochs, "Epochs to train.")
flags.DEFINE_float("wd", _DEFAULTS.wd, "Decoupled weight decay: w <- w - lr*u(dw) - wd*w.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of parameters, data order and noise.")
flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, list(step_lib.OPTIMIZERS), "Optimizer.")
flags.DEFINE_enum("loss", _DEFAULTS.loss, list(losses.LOSSES), "mse (sigmoid outputs) or ce.")
flags.DEFINE_float("sigma", None, "NP noise scale (default 1e-4 for fc, 1e-5 for conv).")
flags.DEFINE_enum("noise", _DEFAULTS.noise, list(perturbation.NOISE_KINDS), "NP noise distribution.")
flags.DEFINE_string("data_dir", _DEFAULTS.data_dir, "Where datasets live (see `nodepert_dist.data fetch`).")
flags.DEFINE_string("workdir", _DEFAULTS.workdir, "Where config.json and metrics are written.")
flags.DEFINE_integer("eval_batchsize", _DEFAULTS.eval_batchsize, "Global batch size of evaluation.")
flags.DEFINE_bool("eval_train", _DEFAULTS.eval_train, "Evaluate on the whole training set each epoch.")
flags.DEFINE_string("save_final_params", "", "If set, write the final parameters to this .npz.")
flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices (testing on CPU).")
FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.cpu_devices > 0:  # before jax.distributed and before any device use
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    try:
        # Multi-process start-up (flags, NODEPERT_* env, SLURM, or a single process).
        distributed.initialize_from_flags()
        rows = train(config_from_flags())
    except (ValueError, sources.DataError, distributed.DistributedError) as e:
        raise SystemExit(f"error: {e}")
    if metrics.is_writer():
        print(json.dumps(rows[-1]))


def cli():
    app.run(main)


if __name__ == "__main__":
    cli()
