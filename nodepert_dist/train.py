"""`nodepert-train`: node perturbation (or SGD) on a device mesh, epoch by epoch.

Sections: config -> mesh -> data -> model and state -> steps -> resume or epoch 0 -> train loop.
Every process runs this same program; process 0 alone writes files and prints progress.
Checkpoints (nodepert_dist/checkpoint.py) go to <workdir>/checkpoints; a run resumes from the
newest one exactly: same data order, noise keys, optimizer state and metric rows.
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

from nodepert_dist import (checkpoint, distributed, losses, metrics, models, optim,
                           perturbation, taps)
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.data import pipeline, preprocess, sources, store

NAN = float("nan")

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
    width: int = 64               # vgg/resnet: channels of the first stage (64: VGG/ResNet-18)
    norm: str = "none"            # vgg/resnet: none, group or layer (never batch: biased NP)
    dtype: str = "float32"        # bfloat16: matmuls/convs in bf16, params and losses in float32
    lr: float = 1e-2
    batchsize: int = 128          # global, over all devices; the original code used 100
    num_epochs: int = 10
    wd: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"
    lr_schedule: str = "constant"  # constant, cosine (to 0 at the last step) or step decay
    warmup_epochs: float = 0.0    # linear warm-up from 0 before the schedule
    lr_decay_epochs: int = 0      # step schedule: multiply lr by lr_decay_factor every N epochs
    lr_decay_factor: float = 0.1
    clip_norm: float = 0.0        # > 0: clip the update's global norm to this, before optimizer
    weight_norm: bool = False     # hold each kernel at its initial norm (Hiratani et al. 2022)
    loss: str = "mse"
    sigma: Optional[float] = None  # None: 1e-4 for fc/linfc, 1e-5 for conv nets
    noise: str = "rademacher"     # on CPU ~40x cheaper to draw than gaussian (README)
    np_mode: str = "keep"
    np_microbatches: int = 1      # NP over this many slices of each device's batch, in turn
    np_antithetic: bool = False   # +sigma/-sigma pairs instead of clean/noisy (perturbation.py)
    np_draws: int = 1             # noise draws per example, averaged, sharing one clean pass
    np_delta: str = "finite"      # finite difference, or jvp: the exact sigma -> 0 limit
    np_layerwise: bool = False    # one noisy pass per tap, each tap's own delta
    data_dir: str = "data"
    workdir: str = "runs/default"
    eval_batchsize: int = 1024
    eval_train: bool = True       # full-train-set accuracy every epoch (as the original code)
    max_steps: int = 0            # stop after this many updates in all (0: no limit); resumable
    checkpoint_every_steps: int = 0   # 0: not by steps
    checkpoint_every_epochs: int = 1  # 0: not by epochs
    keep_checkpoints: int = 3         # the newest N stay (0: all)
    keep_checkpoint_every_steps: int = 0  # also keep every step that is a multiple of this
    resume: bool = True           # continue from the newest checkpoint in the workdir, if any
    preprocess: str = "auto"      # auto: per_channel for CIFAR, standardize for MNIST/FMNIST
    augment: bool = False         # random crop (4-pixel zero padding) and horizontal flip
    validation_size: int = 0      # hold out the last N training examples as a validation split
    cifar100_labels: str = "fine"  # fine (100 classes) or coarse (20)
    data_workers: int = 0         # 0: threaded prefetch; > 0: Grain worker processes

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_every_steps > 0 or self.checkpoint_every_epochs > 0
    save_final_params: str = ""   # if set: .npz of the final parameters (tests compare layouts)

    def resolved(self) -> "Config":
        sigma = self.sigma if self.sigma is not None else models.default_sigma(self.network,
                                                                                self.dtype)
        return dataclasses.replace(self, sigma=float(sigma))

    def validate(self) -> None:
        """One-line errors for bad settings, before anything is loaded or compiled."""
        choices = {"dataset": store.DATASETS, "network": models.NETWORKS,
                   "preprocess": preprocess.MODES, "cifar100_labels": store.LABEL_SETS,
                   "update_rule": step_lib.UPDATE_RULES, "optimizer": step_lib.OPTIMIZERS,
                   "loss": losses.LOSSES, "noise": perturbation.NOISE_KINDS,
                   "np_mode": perturbation.NP_MODES, "norm": models.NORMS,
                   "np_delta": perturbation.NP_DELTAS, "lr_schedule": optim.SCHEDULES,
                   "dtype": tuple(models.DTYPES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = {"lr": self.lr, "batchsize": self.batchsize, "eval_batchsize": self.eval_batchsize,
                    "hl_size": self.hl_size, "np_microbatches": self.np_microbatches,
                    "width": self.width, "np_draws": self.np_draws}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name}={value} must be positive")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"--sigma={self.sigma} must be positive")
        floor = models.sigma_floor(self.network, self.dtype)
        if self.update_rule == "np" and self.sigma is not None and self.sigma < floor:
            raise ValueError(f"--sigma={self.sigma:g} is below {floor:g}, the smallest sigma at "
                             f"which NP on {self.network} in {self.dtype} measured unbiased "
                             f"(bf16 rounds smaller noise away); raise --sigma or use "
                             f"--dtype=float32")
        if self.num_epochs < 0 or self.n_hl < 0 or self.wd < 0:
            raise ValueError("--num_epochs, --n_hl and --wd must be >= 0")
        for name in ("max_steps", "checkpoint_every_steps", "checkpoint_every_epochs",
                     "keep_checkpoints", "keep_checkpoint_every_steps", "validation_size",
                     "data_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        for name in ("warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        if self.lr_schedule == "step" and not self.lr_decay_epochs:
            raise ValueError("--lr_schedule=step needs --lr_decay_epochs > 0")
        perturbation.check_options(self.np_mode, self.np_antithetic, self.np_draws,
                                   self.np_delta)
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ValueError(f"--workdir={self.workdir} is a file, not a folder; "
                             f"use another --workdir")

# Settings a checkpoint must share with the run resuming it (the data position depends on them).
_RESUME_MUST_MATCH = ("dataset", "batchsize", "validation_size", "cifar100_labels")
# Settings a resumed run may change silently.
_RESUME_FREE = ("data_dir", "workdir", "num_epochs", "max_steps", "eval_batchsize", "eval_train",
                "np_mode", "np_microbatches",
                "checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
                "keep_checkpoint_every_steps", "resume", "save_final_params", "data_workers")


# ----------------------------------------------------------------------------- helpers

def evaluate(eval_step, params, batches, prep, mesh) -> tuple[float, float]:
    """(accuracy, mean loss) over a whole split (`pipeline.eval_batches`), on the global batch."""
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}

    def add(out):  # host-side sums; waits for that batch (one in flight, as in the train loop)
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)

    pending = None
    for batch in pipeline.iterate(batches):
        x, y, mask = mesh_lib.global_batch(mesh, *batch)
        out = eval_step(params, prep(x), y, mask)
        if pending is not None:
            add(pending)
        pending = out
    add(pending)
    return totals["correct"] / totals["count"], totals["loss_sum"] / totals["count"]


def _accumulate(sums: dict, step_metrics, step: int, epoch: int) -> None:
    """Adds one step's (global) metrics into host-side epoch sums; waits for that step.

    A non-finite loss stops the run here, before the state it produced is saved: the loop
    accumulates a step's metrics before any checkpoint of that step."""
    m = jax.device_get(step_metrics)
    if not np.isfinite(m["loss_sum"]):
        raise ValueError(f"the training loss is {float(m['loss_sum'])} at step {step} (epoch "
                         f"{epoch}): training diverged; use a lower --lr")
    sums["loss_sum"] += float(m["loss_sum"])
    sums["correct"] += float(m["correct"])
    sums["last_loss"] = float(m["loss_sum"]) / float(m["count"])


# ----------------------------------------------------------------------------- main loop

def train(cfg: Config) -> list[dict]:
    """Runs the whole training; returns the per-epoch metric rows (also written to the workdir)."""
    return run(cfg)[0]


def run(cfg: Config) -> tuple[list[dict], str]:
    """`train`, plus a line saying why the run ended early or did nothing ("" if it finished)."""
    cfg.validate()
    cfg = cfg.resolved()

    # Mesh: one `data` axis over every device of every process.
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch(cfg.batchsize, mesh)
    mesh_lib.check_batch(cfg.eval_batchsize, mesh, "--eval_batchsize")
    per_device = cfg.batchsize // mesh.devices.size
    if cfg.update_rule == "np" and per_device % cfg.np_microbatches:
        raise ValueError(f"--np_microbatches={cfg.np_microbatches} does not divide the "
                         f"{per_device} examples per device; use a divisor of {per_device}")
    logging.info("mesh: %d devices over %d processes (%s)", mesh.devices.size,
                 jax.process_count(), jax.devices()[0].platform)

    # Data: memory-mapped uint8 arrays (store.py); each process gathers only its share, and
    # the preprocessing (training-split statistics) runs per batch on the device.
    data = store.open_dataset(cfg.dataset, cfg.data_dir, cfg.cifar100_labels)
    n_train = len(data.train_y) - cfg.validation_size
    if n_train <= 0:
        raise ValueError(f"--validation_size={cfg.validation_size} leaves no training examples "
                         f"of {len(data.train_y)}")
    splits = {"train": (0, n_train), "val": (n_train, len(data.train_y))}
    n_steps = pipeline.steps_per_epoch(n_train, cfg.batchsize)
    if n_steps == 0:
        raise ValueError(f"--batchsize={cfg.batchsize} is larger than the {n_train} "
                         f"training examples")
    prep_mode = preprocess.resolve(cfg.preprocess, cfg.dataset)
    prep = preprocess.device_fn(prep_mode, preprocess.statistics(
        data.root, data.train_x, prep_mode, *splits["train"]), mesh)
    sample_x = np.zeros((1, *data.train_x.shape[1:]), np.float32)

    # Model, optimizer and replicated train state.
    model = models.build_model(cfg.network, data.num_classes, cfg.n_hl, cfg.hl_size,
                               width=cfg.width, norm=cfg.norm, dtype=cfg.dtype)
    optimizer = step_lib.make_optimizer(
        cfg.optimizer, cfg.lr, cfg.wd, schedule=cfg.lr_schedule,
        total_steps=cfg.num_epochs * n_steps, warmup_steps=round(cfg.warmup_epochs * n_steps),
        decay_every=cfg.lr_decay_epochs * n_steps, decay_factor=cfg.lr_decay_factor,
        clip_norm=cfg.clip_norm, weight_norm=cfg.weight_norm)
    state = step_lib.init_state(model, optimizer, sample_x, cfg.seed, mesh)
    taps.check(model, state.params, sample_x, needs_taps=cfg.update_rule == "np")
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("%s: %d parameters, sigma=%g, %d steps/epoch of %d examples",
                 cfg.network, n_params, cfg.sigma, n_steps, cfg.batchsize)

    # Steps.
    train_step = step_lib.make_train_step(
        model, optimizer, mesh, update_rule=cfg.update_rule, loss=cfg.loss, sigma=cfg.sigma,
        seed=cfg.seed, global_batch=cfg.batchsize, noise=cfg.noise, np_mode=cfg.np_mode,
        np_microbatches=cfg.np_microbatches, np_antithetic=cfg.np_antithetic,
        np_draws=cfg.np_draws, np_delta=cfg.np_delta, np_layerwise=cfg.np_layerwise)
    eval_step = step_lib.make_eval_step(model, mesh, loss=cfg.loss)
    writer = metrics.MetricsWriter(cfg.workdir, dict(
        dataclasses.asdict(cfg), preprocess_resolved=prep_mode,
        data={k: data.meta.get(k) for k in ("source", "verified", "checksum_problem")}))

    def eval_split(images, labels, rows=None):
        return evaluate(eval_step, state.params, pipeline.eval_batches(
            images, labels, global_batch=cfg.eval_batchsize, process_index=jax.process_index(),
            process_count=jax.process_count(), rows=rows), prep, mesh)

    def epoch_row(epoch: int, extra: dict) -> dict:
        test_acc, test_loss = eval_split(data.test_x, data.test_y)
        row = {"epoch": epoch, "step": int(jax.device_get(state.step)),
               "test_acc": test_acc, "test_loss": test_loss}
        if cfg.validation_size:
            row["val_acc"], row["val_loss"] = eval_split(data.train_x, data.train_y, splits["val"])
        if cfg.eval_train:
            row["train_acc"], row["train_loss"] = eval_split(data.train_x, data.train_y,
                                                             splits["train"])
        row.update(extra)
        writer.write(row)
        return row

    # Resume from the newest valid checkpoint, or start with epoch 0 (the untrained network).
    ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
    restored = checkpoint.restore(ckpt_dir, state) if cfg.resume else None
    if restored is None and cfg.checkpointing and checkpoint.committed_steps(ckpt_dir):
        raise ValueError(f"--noresume, but {ckpt_dir} holds checkpoints of an earlier run; "
                         f"remove them or use another --workdir")
    if restored is not None:
        state, manifest = restored
        check_resume_config(manifest["config"], dataclasses.asdict(cfg))
        loop = manifest["loop"]
        saved_order = manifest.get("rng", {}).get("data_order")
        if loop["step_in_epoch"] and saved_order != pipeline.DATA_ORDER:
            raise ValueError(
                f"the checkpoint in {ckpt_dir} stopped mid-epoch under another data order "
                f"({saved_order!r}); resuming would repeat or skip examples. Resume it with the "
                f"version that saved it, or remove checkpoints back to an epoch boundary")
        rows, epoch_start, step_start = loop["rows"], loop["epoch"], loop["step_in_epoch"]
        # The running sums of the interrupted epoch (host floats: JSON keeps them exactly).
        resumed_sums = loop["sums"]
        resumed_elapsed = loop["elapsed"]
        writer.truncate_after(epoch_start - 1)
        logging.info("resumed from %s at epoch %d, step %d of the epoch (step %d in all)",
                     ckpt_dir, epoch_start, step_start, manifest["step"])
    else:
        rows, epoch_start, step_start = [epoch_row(0, {})], 1, 0
        resumed_sums, resumed_elapsed = None, 0.0
    saver = (checkpoint.Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints,
                                     keep_every_steps=cfg.keep_checkpoint_every_steps)
             if cfg.checkpointing else None)
    step = int(jax.device_get(state.step))

    def save(epoch: int, step_in_epoch: int, sums, elapsed: float) -> None:
        """The loop's whole position: resuming runs from batch `step_in_epoch` of `epoch`."""
        position = {"epoch": epoch, "step_in_epoch": step_in_epoch,
                    "process_index": jax.process_index(), "process_count": jax.process_count()}
        saver.save(step, state, position=position, meta={
            "epoch": epoch, "config": dataclasses.asdict(cfg),
            "rng": {"seed": cfg.seed,
                    "noise_keys": "fold_in(fold_in(seed, noise tag), step, example index)",
                    "data_order": pipeline.DATA_ORDER},
            "loop": {"epoch": epoch, "step_in_epoch": step_in_epoch, "sums": sums,
                     "elapsed": elapsed, "rows": list(rows)}})

    def accumulate(sums, pending, epoch: int) -> None:
        try:
            _accumulate(sums, *pending, epoch)
        except ValueError:
            if saver:  # finish the save in flight (a finite state): exiting mid-write aborts
                saver.wait()
            raise

    def save_due(step: int) -> bool:
        return bool(saver and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)

    def stop_due(step: int) -> bool:
        return bool(cfg.max_steps and step >= cfg.max_steps)

    # Train loop.
    for epoch in range(epoch_start, cfg.num_epochs + 1):
        if stop_due(step):
            break
        batches = pipeline.train_batches(
            data.train_x, data.train_y, global_batch=cfg.batchsize, seed=cfg.seed, epoch=epoch,
            process_index=jax.process_index(), process_count=jax.process_count(),
            rows=splits["train"], augment=cfg.augment)
        progress = metrics.Progress(epoch, n_steps, cfg.batchsize)
        first = step_start if epoch == epoch_start else 0
        sums = dict(resumed_sums) if first else {"loss_sum": 0.0, "correct": 0.0, "last_loss": NAN}
        start = time.perf_counter() - (resumed_elapsed if first else 0.0)
        done, pending = first, None  # pending: (metrics, step) of the step in flight
        for i, (x, y) in enumerate(pipeline.iterate(batches, start=first, workers=cfg.data_workers),
                                   start=first):
            x, y = mesh_lib.global_batch(mesh, x, y)
            state, m = train_step(state, prep(x), y)
            step, done = step + 1, i + 1
            # At most one step in flight: dispatch step i, then wait for step i-1's metrics.
            # A deeper queue buys nothing here and, with simulated CPU devices, can deadlock
            # XLA's host thread pool in a collective rendezvous.
            if pending is not None:
                accumulate(sums, pending, epoch)
            pending = (m, step)
            progress.update(done, lambda: sums["last_loss"])
            if done < n_steps and (save_due(step) or (saver and stop_due(step))):
                accumulate(sums, pending, epoch)
                pending = None
                save(epoch, done, sums, time.perf_counter() - start)
            if stop_due(step):
                break
        if pending is not None:
            accumulate(sums, pending, epoch)
        if done < n_steps:  # stopped by --max_steps inside the epoch: no row for it
            break
        epoch_time = time.perf_counter() - start
        mean_loss = float(sums["loss_sum"]) / (n_steps * cfg.batchsize)
        rows.append(epoch_row(epoch, {
            "epoch_time": epoch_time, "mean_step_loss": mean_loss,
            "step_train_acc": float(sums["correct"]) / (n_steps * cfg.batchsize),
            "examples_per_s": n_steps * cfg.batchsize / epoch_time}))
        if saver and (save_due(step) or stop_due(step) or epoch == cfg.num_epochs
                      or (cfg.checkpoint_every_epochs and epoch % cfg.checkpoint_every_epochs == 0)):
            save(epoch + 1, 0, None, 0.0)
    if saver:
        saver.wait()
    if cfg.save_final_params:
        distributed.save_params_npz(cfg.save_final_params, state.params)
    # Said at the end: otherwise the last line printed is an earlier epoch's row.
    note = ""
    if restored is not None and epoch_start > cfg.num_epochs:
        note = (f"already finished: {cfg.num_epochs} epochs done (step {step}); nothing to do "
                f"(raise --num_epochs to train on)")
    elif rows[-1]["epoch"] < cfg.num_epochs and stop_due(step):
        note = (f"stopped at --max_steps={cfg.max_steps} (step {step}, {rows[-1]['epoch']} of "
                f"{cfg.num_epochs} epochs done); rerun with a larger --max_steps to continue")
    if note:
        logging.info("%s", note)
    return rows, note


def check_resume_config(saved: dict, current: dict) -> None:
    """Errors for settings that break the data position; warnings for other changed settings."""
    for name in _RESUME_MUST_MATCH:
        if saved.get(name) != current[name]:
            raise ValueError(f"the checkpoint was saved with --{name}={saved.get(name)}, this run "
                             f"has --{name}={current[name]}; resuming needs the same value")
    changed = [f"--{k}: {saved.get(k)} -> {v}" for k, v in current.items()
               if k not in _RESUME_FREE and saved.get(k) != v]
    if changed:
        logging.warning("resuming with changed settings: %s", ", ".join(changed))


# ----------------------------------------------------------------------------- CLI

_DEFAULTS = Config()
flags.DEFINE_enum("dataset", _DEFAULTS.dataset, list(store.DATASETS),
                  "Dataset (fetch it first: python -m nodepert_dist.data fetch NAME).")
flags.DEFINE_enum("network", _DEFAULTS.network, list(models.NETWORKS), "Architecture.")
flags.DEFINE_enum("update_rule", _DEFAULTS.update_rule, list(step_lib.UPDATE_RULES),
                  "np: node perturbation; sgd: backprop gradients.")
flags.DEFINE_integer("n_hl", _DEFAULTS.n_hl, "Hidden layers of fc/linfc.")
flags.DEFINE_integer("hl_size", _DEFAULTS.hl_size, "Units per hidden layer of fc/linfc.")
flags.DEFINE_integer("width", _DEFAULTS.width, "vgg/vgg16/resnet: channels of the first stage "
                     "(64 is VGG/ResNet-18; later stages have 2x, 4x, 8x).")
flags.DEFINE_enum("norm", _DEFAULTS.norm, list(models.NORMS), "vgg/vgg16/resnet: per-example "
                  "normalisation before each tap (batch norm would bias NP).")
flags.DEFINE_enum("dtype", _DEFAULTS.dtype, list(models.DTYPES), "Compute dtype of matmuls and "
                  "convs; parameters, optimizer state and loss differences stay float32.")
flags.DEFINE_float("lr", _DEFAULTS.lr, "Learning rate.")
flags.DEFINE_integer("batchsize", _DEFAULTS.batchsize, "Global batch size (all devices).")
flags.DEFINE_integer("num_epochs", _DEFAULTS.num_epochs, "Epochs to train.")
flags.DEFINE_float("wd", _DEFAULTS.wd, "Decoupled weight decay: w <- w - lr*u(dw) - wd*w.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of parameters, data order and noise.")
flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, list(step_lib.OPTIMIZERS), "Optimizer.")
flags.DEFINE_enum("lr_schedule", _DEFAULTS.lr_schedule, list(optim.SCHEDULES),
                  "lr over training: constant, cosine (decays to 0 at the last step of "
                  "--num_epochs) or step (x --lr_decay_factor every --lr_decay_epochs).")
flags.DEFINE_float("warmup_epochs", _DEFAULTS.warmup_epochs,
                   "Linear lr warm-up from 0 over this many epochs, before --lr_schedule.")
flags.DEFINE_integer("lr_decay_epochs", _DEFAULTS.lr_decay_epochs,
                     "--lr_schedule=step: decay every N epochs.")
flags.DEFINE_float("lr_decay_factor", _DEFAULTS.lr_decay_factor,
                   "--lr_schedule=step: multiply lr by this at each decay.")
flags.DEFINE_float("clip_norm", _DEFAULTS.clip_norm,
                   "If > 0, clip the update's global norm (all layers) to this before the optimizer.")
flags.DEFINE_bool("weight_norm", _DEFAULTS.weight_norm,
                  "After each update, rescale every kernel to its initial norm (weight "
                  "normalisation against NP's weight diffusion, Hiratani et al. 2022).")
flags.DEFINE_enum("loss", _DEFAULTS.loss, list(losses.LOSSES), "mse (sigmoid outputs) or ce.")
flags.DEFINE_float("sigma", None, "NP noise scale (default: 1e-5 for conv/conv-large, 1e-4 "
                   "otherwise; in bfloat16 the measured floor, see README).")
flags.DEFINE_enum("noise", _DEFAULTS.noise, list(perturbation.NOISE_KINDS),
                  "NP noise distribution: rademacher (random signs) or gaussian.")
flags.DEFINE_enum("np_mode", _DEFAULTS.np_mode, list(perturbation.NP_MODES),
                  "keep: reuse the noise of the noisy pass in the update; regen: draw it again "
                  "from its keys (nothing kept alive). Same update.")
flags.DEFINE_integer("np_microbatches", _DEFAULTS.np_microbatches,
                     "Run NP over this many slices of each device's batch in turn: activation "
                     "memory / N, same update and FLOPs.")
flags.DEFINE_bool("np_antithetic", _DEFAULTS.np_antithetic,
                  "NP: noisy passes at +sigma*xi and -sigma*xi replace clean and noisy, delta = "
                  "(L+ - L-)/2 (even orders of sigma cancel); same cost.")
flags.DEFINE_integer("np_draws", _DEFAULTS.np_draws,
                     "NP: noise draws per example sharing one clean pass, averaged (variance / K, "
                     "cost ~K noisy passes).")
flags.DEFINE_enum("np_delta", _DEFAULTS.np_delta, list(perturbation.NP_DELTAS),
                  "NP: finite (loss difference / sigma) or jvp (exact directional derivative "
                  "along the noise by forward-mode AD: the sigma -> 0 limit, no rounding).")
flags.DEFINE_bool("np_layerwise", _DEFAULTS.np_layerwise,
                  "NP: one noisy pass per tap, perturbing that tap alone; each tap's update "
                  "uses its own pass's delta. Cost: one noisy pass per tap.")
flags.DEFINE_string("data_dir", _DEFAULTS.data_dir, "Where datasets live (see `nodepert_dist.data fetch`).")
flags.DEFINE_string("workdir", _DEFAULTS.workdir, "Where config.json and metrics are written.")
flags.DEFINE_integer("eval_batchsize", _DEFAULTS.eval_batchsize, "Global batch size of evaluation.")
flags.DEFINE_bool("eval_train", _DEFAULTS.eval_train, "Evaluate on the whole training set each epoch.")
flags.DEFINE_integer("max_steps", _DEFAULTS.max_steps,
                     "Stop after this many updates in all (0: no limit); a later run resumes.")
flags.DEFINE_integer("checkpoint_every_steps", _DEFAULTS.checkpoint_every_steps,
                     "Checkpoint every N updates (0: not by steps).")
flags.DEFINE_integer("checkpoint_every_epochs", _DEFAULTS.checkpoint_every_epochs,
                     "Checkpoint every N epochs (0: not by epochs); the last epoch always is.")
flags.DEFINE_integer("keep_checkpoints", _DEFAULTS.keep_checkpoints,
                     "Keep the newest N checkpoints (0: all).")
flags.DEFINE_integer("keep_checkpoint_every_steps", _DEFAULTS.keep_checkpoint_every_steps,
                     "Also keep, permanently, checkpoints at multiples of N steps (0: none).")
flags.DEFINE_bool("resume", _DEFAULTS.resume,
                  "Continue from the newest valid checkpoint in <workdir>/checkpoints, if any.")
flags.DEFINE_string("save_final_params", "", "If set, write the final parameters to this .npz.")
flags.DEFINE_enum("preprocess", _DEFAULTS.preprocess, list(preprocess.MODES),
                  "auto (per_channel for CIFAR, standardize otherwise), standardize (train-set "
                  "mean/std), per_channel, unit ([0, 1]) or zca (ZCA whitening).")
flags.DEFINE_bool("augment", _DEFAULTS.augment, "Random crop (4-pixel padding) and horizontal flip "
                  "of training images, a pure function of (seed, epoch, example).")
flags.DEFINE_integer("validation_size", _DEFAULTS.validation_size,
                     "Hold out the last N training examples as a validation split (val_acc).")
flags.DEFINE_enum("cifar100_labels", _DEFAULTS.cifar100_labels, list(store.LABEL_SETS),
                  "CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses).")
flags.DEFINE_integer("data_workers", _DEFAULTS.data_workers,
                     "Input prefetch: 0 = threads in each process, N > 0 = N Grain worker processes.")
flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices (testing on CPU).")
flags.DEFINE_bool("xla_cpu_conv_flag", True,
                  f"On CPU, add XLA_FLAGS={mesh_lib.CPU_CONV_FLAG} (faster convolutions, "
                  "measured) unless XLA_FLAGS already sets that option.")
FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.xla_cpu_conv_flag:  # before the CPU backend starts
        mesh_lib.tune_cpu_convolutions()
    if FLAGS.cpu_devices > 0:  # before jax.distributed and before any device use
        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    try:
        # Multi-process start-up (flags, NODEPERT_* env, SLURM, or a single process).
        distributed.initialize_from_flags()
        rows, note = run(config_from_flags())
    # checkpoint.CheckpointError is a ValueError
    except (ValueError, sources.DataError, distributed.DistributedError) as e:
        raise SystemExit(f"error: {e}")
    if metrics.is_writer():
        print(json.dumps(rows[-1]))
        if note:
            print(note)


def cli():
    app.run(main)


if __name__ == "__main__":
    cli()
