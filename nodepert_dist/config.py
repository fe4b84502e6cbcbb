"""The settings of `nodepert-train`: one declaration each, flags generated from it, presets.

Each setting is one `Config` field declared with `setting(default, help, group=..., ...)`; the
absl flag of the same name, its help text, its enum choices and its `--help` group are generated
from that field (`define_flags`). Adding a setting is one line here.

Where a run's settings come from, last wins: the field defaults, then `--config=NAME` (a preset
in PRESETS) or `--config=PATH.json` (a JSON object of settings), then the flags given on the
command line. The resolved settings are what the run records in `<workdir>/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Optional

from absl import flags

from nodepert_dist import cli, decorrelation, losses, models, optim, perturbation
from nodepert_dist import step as step_lib
from nodepert_dist.data import preprocess, store
from nodepert_dist.experiments import presets as experiment_presets

# The `--help` groups, in the order they are printed.
GROUPS = ("settings", "data", "model", "training", "node perturbation", "evaluation",
          "outputs and checkpoints", "machine", "cluster")
CLUSTER_MODULE = "nodepert_dist.distributed"  # its flags form the "cluster" group


def setting(default, help: str, *, group: str, choices=None):
    """A Config field; what a resumed run may do with it is in RESUME_RULES."""
    assert group in GROUPS
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, choices=None if choices is None else tuple(choices)))


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = setting("mnist", "Dataset (fetch it first: python -m nodepert_dist.data "
                           "fetch NAME).", group="data", choices=store.DATASETS)
    data_dir: str = setting("data", "Where datasets live.", group="data")
    preprocess: str = setting("auto", "auto (per_channel for CIFAR, standardize otherwise), "
                              "standardize (train-set mean/std), per_channel, unit ([0, 1]) or "
                              "zca (ZCA whitening).", group="data", choices=preprocess.MODES)
    augment: bool = setting(False, "Random crop (4-pixel padding) and horizontal flip of "
                            "training images, a pure function of (seed, epoch, example).",
                            group="data")
    validation_size: int = setting(0, "Hold out the last N training examples as a validation "
                                   "split (val_acc).", group="data")
    cifar100_labels: str = setting("fine", "CIFAR-100 labels: fine (100 classes) or coarse "
                                   "(20 superclasses).", group="data", choices=store.LABEL_SETS)
    data_workers: int = setting(0, "Input prefetch: 0 = threads in each process, N > 0 = N "
                                "Grain worker processes.", group="data")
    # model
    network: str = setting("fc", "Architecture.", group="model", choices=models.NETWORKS)
    n_hl: int = setting(2, "Hidden layers of fc/linfc.", group="model")
    hl_size: int = setting(500, "Units per hidden layer of fc/linfc.", group="model")
    width: int = setting(64, "vgg/vgg16/resnet: channels of the first stage (64 is "
                         "VGG/ResNet-18; later stages have 2x, 4x, 8x).", group="model")
    norm: str = setting("none", "vgg/vgg16/resnet: per-example normalisation before each tap "
                        "(batch norm would bias NP).", group="model", choices=models.NORMS)
    dtype: str = setting("float32", "Compute dtype of matmuls and convs; parameters, optimizer "
                         "state and loss differences stay float32.", group="model",
                         choices=tuple(models.DTYPES))
    # training
    update_rule: str = setting("np", "np: node perturbation; sgd: backprop gradients.",
                               group="training", choices=step_lib.UPDATE_RULES)
    lr: float = setting(1e-2, "Learning rate.", group="training")
    batchsize: int = setting(128, "Global batch size, over all devices (the original code "
                             "used 100).", group="training")
    num_epochs: int = setting(10, "Epochs to train.", group="training")
    wd: float = setting(0.0, "Decoupled weight decay: w <- w - lr*u(dw) - wd*w.",
                        group="training")
    seed: int = setting(0, "Seed of parameters, data order and noise.", group="training")
    optimizer: str = setting("sgd", "Optimizer.", group="training", choices=step_lib.OPTIMIZERS)
    lr_schedule: str = setting("constant", "lr over training: constant, cosine (decays to 0 "
                               "over --lr_schedule_epochs) or step (x --lr_decay_factor every "
                               "--lr_decay_epochs).", group="training", choices=optim.SCHEDULES)
    lr_schedule_epochs: int = setting(0, "--lr_schedule=cosine: epochs until the lr reaches 0 "
                                      "(0: --num_epochs of the run's first start; a resumed run "
                                      "keeps the recorded value).", group="training")
    warmup_epochs: float = setting(0.0, "Linear lr warm-up from 0 over this many epochs, before "
                                   "--lr_schedule.", group="training")
    lr_decay_epochs: int = setting(0, "--lr_schedule=step: decay every N epochs.",
                                   group="training")
    lr_decay_factor: float = setting(0.1, "--lr_schedule=step: multiply lr by this at each "
                                     "decay.", group="training")
    clip_norm: float = setting(0.0, "If > 0, clip the update's global norm (all layers) to this "
                               "before the optimizer.", group="training")
    weight_norm: bool = setting(False, "After each update, rescale every kernel to its initial "
                                "norm (weight normalisation against NP's weight diffusion, "
                                "Hiratani et al. 2022).", group="training")
    loss: str = setting("mse", "mse (sigmoid outputs) or ce.", group="training",
                        choices=losses.LOSSES)
    max_steps: int = setting(0, "Stop after this many updates in all (0: no limit); a later "
                             "run resumes.", group="training")
    crash_guard: bool = setting(False, "On a non-finite loss or a crash (test accuracy "
                                "--crash_points below the best so far), roll back to the last "
                                "good checkpoint and multiply the lr by --crash_lr_factor; "
                                "events go to metrics.jsonl.", group="training")
    crash_points: float = setting(25.0, "A crash: test accuracy this many percentage points "
                                  "below the best so far.", group="training")
    crash_lr_factor: float = setting(0.5, "The crash guard multiplies the lr by this at each "
                                     "rollback.", group="training")
    crash_max_rollbacks: int = setting(3, "The crash guard gives up after this many "
                                       "rollbacks.", group="training")
    # node perturbation
    sigma: Optional[float] = setting(None, "NP noise scale (default: 1e-5 for conv/conv-large, "
                                     "1e-4 otherwise; in bfloat16 the measured floor, see "
                                     "docs/results/bf16_sigma.md).", group="node perturbation")
    noise: str = setting("rademacher", "NP noise distribution: rademacher (random signs; on "
                         "CPU ~40x cheaper to draw) or gaussian.", group="node perturbation",
                         choices=perturbation.NOISE_KINDS)
    np_mode: str = setting("keep", "keep: reuse the noise of the noisy pass in the update; "
                           "regen: draw it again from its keys (nothing kept alive). Same "
                           "update.", group="node perturbation", choices=perturbation.NP_MODES)
    np_microbatches: int = setting(1, "Run NP over this many slices of each device's batch in "
                                   "turn: activation memory / N, same update and FLOPs.",
                                   group="node perturbation")
    np_antithetic: bool = setting(False, "Noisy passes at +sigma*xi and -sigma*xi replace clean "
                                  "and noisy, delta = (L+ - L-)/2; same FLOPs.",
                                  group="node perturbation")
    np_draws: int = setting(1, "Noise draws per example sharing one clean pass, averaged "
                            "(variance / K, cost ~K noisy passes).", group="node perturbation")
    np_delta: str = setting("finite", "finite (loss difference / sigma) or jvp (the exact "
                            "directional derivative along the noise by forward-mode AD: the "
                            "sigma -> 0 limit, no rounding).", group="node perturbation",
                            choices=perturbation.NP_DELTAS)
    np_layerwise: bool = setting(False, "One noisy pass per tap, perturbing that tap alone; each "
                                 "tap's update uses its own pass's delta. Cost: one noisy pass "
                                 "per tap.", group="node perturbation")
    np_estimator: str = setting("per_example", "per_example: each example's own noise and loss "
                                "change (unbiased). original: the original research code's "
                                "estimator, for comparison only: one noise draw shared by the "
                                "batch and the batch-mean loss change; BIASED (docs/design).",
                                group="node perturbation", choices=perturbation.NP_ESTIMATORS)
    np_local: bool = setting(False, "fc/linfc: block-local losses. Each hidden layer gets an "
                             "auxiliary linear readout (trained by NP too); each block's update "
                             "uses the change of its own readout's loss, noise on its taps "
                             "only.", group="node perturbation")
    decorrelate: bool = setting(False, "fc/linfc/conv/conv-large: a learned matrix R "
                                "decorrelates each layer's input (conv: its channels) before the "
                                "weights, by its own local rule R <- R - lr_d * offdiag(E[x'x'^T]) "
                                "R (Dalm et al.); NP or SGD train the weights with R fixed.",
                                group="training")
    decorrelate_lr: float = setting(1e-4, "--decorrelate: the learning rate lr_d of R's "
                                    "rule.", group="training")
    # evaluation
    eval_batchsize: int = setting(1024, "Global batch size of evaluation.", group="evaluation")
    eval_train: bool = setting(True, "Evaluate on the whole training set each epoch (as the "
                               "original code).", group="evaluation")
    # outputs and checkpoints
    workdir: str = setting("runs/default", "Where config.json, metrics and checkpoints are "
                           "written.", group="outputs and checkpoints")
    checkpoint_every_steps: int = setting(0, "Checkpoint every N updates (0: not by steps).",
                                          group="outputs and checkpoints")
    checkpoint_every_epochs: int = setting(1, "Checkpoint every N epochs (0: not by epochs); "
                                           "the last epoch always is.",
                                           group="outputs and checkpoints")
    keep_checkpoints: int = setting(3, "Keep the newest N checkpoints (0: all).",
                                    group="outputs and checkpoints")
    keep_checkpoint_every_steps: int = setting(0, "Also keep, permanently, checkpoints at "
                                               "multiples of N steps (0: none).",
                                               group="outputs and checkpoints")
    resume: bool = setting(True, "Continue from the newest valid checkpoint in "
                           "<workdir>/checkpoints, if any.", group="outputs and checkpoints")
    save_final_params: str = setting("", "If set, write the final parameters (and --decorrelate's "
                                     "matrices, under decorrelation.) to this .npz.",
                                     group="outputs and checkpoints")
    preemption_check_steps: int = setting(1, "On SIGTERM/SIGUSR1, all processes agree to stop "
                                          "at the next multiple of N steps (multi-process: one "
                                          "small collective per N steps), checkpoint and exit "
                                          "75.", group="outputs and checkpoints")

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_every_steps > 0 or self.checkpoint_every_epochs > 0

    def resolved(self) -> "Config":
        sigma = self.sigma if self.sigma is not None else models.default_sigma(self.network,
                                                                                self.dtype)
        return dataclasses.replace(self, sigma=float(sigma))

    def validate(self) -> None:
        """One-line errors for bad settings, before anything is loaded or compiled."""
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"--{f.name}={getattr(self, f.name)!r} is not one of "
                                 f"{', '.join(allowed)}")
        positive = {"lr": self.lr, "batchsize": self.batchsize, "eval_batchsize": self.eval_batchsize,
                    "hl_size": self.hl_size, "np_microbatches": self.np_microbatches,
                    "width": self.width, "preemption_check_steps": self.preemption_check_steps}
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
        self._check_schedule()
        if not self.np_draws > 0:
            raise ValueError(f"--np_draws={self.np_draws} must be positive")
        perturbation.check_options(self.np_mode, self.np_antithetic, self.np_draws,
                                   self.np_delta, estimator=self.np_estimator,
                                   layerwise=self.np_layerwise,
                                   microbatches=self.np_microbatches, local=self.np_local)
        self._check_decorrelation()
        if not (self.crash_points > 0 and 0 < self.crash_lr_factor < 1
                and self.crash_max_rollbacks >= 0):
            raise ValueError("--crash_points must be > 0, --crash_lr_factor in (0, 1) and "
                             "--crash_max_rollbacks >= 0")
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ValueError(f"--workdir={self.workdir} is a file, not a folder; "
                             f"use another --workdir")

    def _check_decorrelation(self) -> None:
        if self.decorrelate:
            decorrelation.check(self.network)
            if not self.decorrelate_lr > 0:
                raise ValueError(f"--decorrelate_lr={self.decorrelate_lr:g} must be positive")
        elif self.decorrelate_lr != Config.__dataclass_fields__["decorrelate_lr"].default:
            raise ValueError("--decorrelate_lr is the rate of --decorrelate's matrices; give "
                             "--decorrelate too, or drop --decorrelate_lr")

    def _check_schedule(self) -> None:
        """lr schedule settings that the chosen schedule ignores or that cannot take effect."""
        kind, warmup, n = self.lr_schedule, self.warmup_epochs, self.num_epochs
        horizon = self.lr_schedule_epochs or n
        if kind != "cosine" and self.lr_schedule_epochs:
            raise ValueError(f"--lr_schedule_epochs={self.lr_schedule_epochs} is the cosine "
                             f"schedule's length; --lr_schedule={kind} ignores it: drop it")
        factor_default = Config.__dataclass_fields__["lr_decay_factor"].default
        if kind != "step" and (self.lr_decay_epochs or self.lr_decay_factor != factor_default):
            raise ValueError(f"--lr_decay_epochs and --lr_decay_factor apply to "
                             f"--lr_schedule=step only; --lr_schedule={kind} ignores them: "
                             f"drop them or use --lr_schedule=step")
        if kind == "step" and not 0 < self.lr_decay_factor < 1:
            raise ValueError(f"--lr_decay_factor={self.lr_decay_factor:g} must be in (0, 1): " + (
                "it would make the lr grow" if self.lr_decay_factor >= 1 else
                "the lr would be 0 after the first decay"))
        if kind == "step" and warmup + self.lr_decay_epochs >= n:
            raise ValueError(f"--lr_decay_epochs={self.lr_decay_epochs}: the first decay comes "
                             f"after epoch {warmup + self.lr_decay_epochs:g}, not inside the "
                             f"run's --num_epochs={n}; use a smaller --lr_decay_epochs")
        if kind == "cosine" and n > horizon:
            raise ValueError(f"--num_epochs={n} goes past the cosine schedule's {horizon} epochs "
                             f"(--lr_schedule_epochs, kept from the run's first start), where "
                             f"its lr is 0; to train on, also give --lr_schedule_epochs={n} "
                             f"(the cosine is then recomputed over {n} epochs)")
        if warmup and warmup >= (horizon if kind == "cosine" else n):
            length = (f"the cosine schedule's {horizon} epochs" if kind == "cosine"
                      else f"--num_epochs={n}")
            raise ValueError(f"--warmup_epochs={warmup:g} does not end inside {length}: the lr "
                             f"would never reach --lr; use fewer warm-up epochs")


# ----------------------------------------------------------------------------- resuming

# What a resumed run may do with a setting whose value differs from the checkpoint's. The one
# table of these rules (docs/design/checkpoints.md, Resuming with other settings); one row each.
RESUME_RULES = {
    # Allowed silently: where and how the run executes and what it writes, not what it computes
    # (np_mode and np_microbatches give the same update).
    "free": ("data_dir", "data_workers", "num_epochs", "max_steps", "crash_guard",
             "crash_points", "crash_lr_factor", "crash_max_rollbacks", "np_mode",
             "np_microbatches", "eval_batchsize", "eval_train", "workdir",
             "checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
             "keep_checkpoint_every_steps", "resume", "save_final_params",
             "preemption_check_steps"),
    # Allowed, logged: training continues from the checkpoint under the new value. Optimizer
    # parts the checkpoint lacks (--optimizer, --clip_norm, --wd, --weight_norm) start fresh
    # (Adam's moments at 0, weight norms held at their values at the resume); parts this run
    # lacks are dropped. lr settings apply from the resume step (the lr jump is logged).
    "warn": ("preprocess", "dtype", "update_rule", "lr", "wd", "optimizer", "lr_schedule",
             "warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "clip_norm", "weight_norm",
             "loss", "sigma", "noise", "np_antithetic", "np_draws", "np_delta", "np_layerwise",
             "np_estimator", "decorrelate_lr"),
    # Allowed (logged) at an epoch boundary; refused mid-epoch: they choose the epoch's batches
    # (order, crops and flips), so the rest of the epoch would repeat and skip examples.
    "epoch": ("seed", "augment"),
    # Refused: the train state's arrays (np_local's heads, decorrelate's matrices) or the
    # position in the data depend on them.
    "refuse": ("dataset", "validation_size", "cifar100_labels", "batchsize", "network", "n_hl",
               "hl_size", "width", "norm", "np_local", "decorrelate"),
    # Not given (0): the checkpoint's value is kept, so --num_epochs never moves the cosine
    # schedule; given: as "warn".
    "inherit": ("lr_schedule_epochs",),
}
RESUME_RULE = {name: rule for rule, names in RESUME_RULES.items() for name in names}
# resume.settle_resume applies them.


# ----------------------------------------------------------------------------- presets

# Named sets of settings for `--config=NAME`; flags on the command line override them. Add one
# as a dict of Config field names to values (checked against the fields at start-up).
PRESETS: dict[str, dict] = {
    # README's main job, NP half: fc 784-500-500-10 on MNIST at the stable NP lr.
    "mnist_np": dict(dataset="mnist", network="fc", update_rule="np", loss="mse", lr=0.02,
                     batchsize=128, num_epochs=10, seed=0),
    # The paper's settings and the experiments' base runs (experiments/presets.py).
    **experiment_presets.PRESETS,
}


def overrides(name_or_path: str) -> dict:
    """The settings of a preset name or a JSON file, checked against Config's fields."""
    if name_or_path in PRESETS:
        values = PRESETS[name_or_path]
    elif name_or_path.endswith(".json") or os.path.exists(name_or_path):
        try:
            with open(name_or_path, encoding="utf-8-sig") as f:  # Windows editors add a BOM
                values = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--config={name_or_path}: cannot read it as JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config={name_or_path}: expected a JSON object of settings")
    else:
        raise ValueError(f"--config={name_or_path} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a JSON file")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"--config={name_or_path}: unknown setting(s) {', '.join(unknown)}")
    return dict(values)


# ----------------------------------------------------------------------------- flags

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
           str: flags.DEFINE_string}


def define_flags(cls=Config) -> None:
    """One absl flag per field of `cls`: its type, default, help text, choices and group."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional
        meta = f.metadata
        if meta["choices"] is not None:
            flags.DEFINE_enum(f.name, f.default, list(meta["choices"]), meta["help"],
                              module_name=meta["group"])
        else:
            _DEFINE[kind](f.name, f.default, meta["help"], module_name=meta["group"])


define_flags()
flags.DEFINE_string("config", None, "A preset (" + ", ".join(PRESETS) + ") or a JSON file of "
                    "settings; flags given on the command line override it.",
                    module_name="settings")
flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices (tests the "
                     "multi-device path on a CPU; slower than 1 device there).",
                     module_name="machine")
flags.DEFINE_bool("xla_cpu_conv_flag", True, "On CPU, add the measured XLA flag for faster "
                  "convolutions unless XLA_FLAGS already sets that option.",
                  module_name="machine")
FLAGS = flags.FLAGS


def from_flags() -> Config:
    """Config from the parsed flags: defaults < --config < flags given on the command line."""
    preset = overrides(FLAGS.config) if FLAGS.config else {}
    values = {}
    for f in dataclasses.fields(Config):
        flag = FLAGS[f.name]
        if flag.present or f.name not in preset:
            values[f.name] = flag.value
        else:  # the flag's parser checks the type and the choices
            value = preset[f.name]
            try:
                values[f.name] = None if value is None else flag.parser.parse(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--config={FLAGS.config}: {f.name}={value!r}: {e}") from None
    return Config(**values)


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` of nodepert-train: grouped --help, one-line flag errors."""
    from nodepert_dist import train  # its USAGE text
    groups = {g: CLUSTER_MODULE if g == "cluster" else g for g in GROUPS}
    return cli.parse_flags(argv, "nodepert-train", train.USAGE, groups)
