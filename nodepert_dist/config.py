"""The settings of `nodepert-train`: one declaration each, flags generated from it, presets.

Each setting is one field declared with `setting(default, help, group=..., ...)` (settings.py) in
its concern's settings group, next to the code it configures (DataSettings in data/pipeline.py,
ModelSettings in models.py, TrainingSettings in step.py, OptimSettings in optim.py, NPSettings in
estimator.py, DecorrelationSettings in decorrelation.py, CrashGuardSettings in crash_guard.py;
evaluation and outputs here). `Config` joins them into one flat dataclass; the absl flag of the
same name, its help text, its enum choices and its `--help` group are generated from each field
(`define_flags`). Adding a setting is one field in its group plus its row in RESUME_RULES.
Where a run's settings come from, last wins: the field defaults, then `--config=NAME` (a preset
in presets.py) or `--config=PATH.json` (a JSON object of settings), then the flags given on the
command line. The resolved settings are what the run records in `<workdir>/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing

from absl import flags

from nodepert_dist import cli, population, precision
from nodepert_dist import presets as presets_lib
from nodepert_dist.crash_guard import CrashGuardSettings
from nodepert_dist.data.pipeline import DataSettings
from nodepert_dist.decorrelation import DecorrelationSettings
from nodepert_dist.estimator import NPSettings
from nodepert_dist.models import ModelSettings
from nodepert_dist.optim import OptimSettings
from nodepert_dist.resume_rules import RESUME_RULE, RESUME_RULES  # noqa: F401 (its home)
from nodepert_dist.settings import GROUPS, check_non_negative, check_positive, project, setting
from nodepert_dist.step import TrainingSettings

CLUSTER_MODULE = "nodepert_dist.distributed"  # its flags form the "cluster" group


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    eval_batchsize: int = setting(1024, "Global batch size of evaluation.", group="evaluation")
    eval_train: bool = setting(
        True,
        "Evaluate on the whole training set each epoch (as the original code).",
        group="evaluation",
    )

    def validate(self) -> None:
        check_positive(self, "eval_batchsize")


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    workdir: str = setting(
        "runs/default",
        "Where config.json, metrics and checkpoints are written.",
        group="outputs and checkpoints",
    )
    checkpoint_every_steps: int = setting(
        0, "Checkpoint every N updates (0: not by steps).", group="outputs and checkpoints"
    )
    checkpoint_every_epochs: int = setting(
        1,
        "Checkpoint every N epochs (0: not by epochs); the last epoch always is.",
        group="outputs and checkpoints",
    )
    keep_checkpoints: int = setting(
        3, "Keep the newest N checkpoints (0: all).", group="outputs and checkpoints"
    )
    keep_checkpoint_every_steps: int = setting(
        0,
        "Also keep, permanently, checkpoints at multiples of N steps (0: none).",
        group="outputs and checkpoints",
    )
    resume: bool = setting(
        True,
        "Continue from the newest valid checkpoint in <workdir>/checkpoints, if any.",
        group="outputs and checkpoints",
    )
    save_final_params: str = setting(
        "",
        "If set, write the final parameters (and --decorrelate's "
        "matrices, under decorrelation.) to this .npz (a --population's: stacked).",
        group="outputs and checkpoints",
    )
    preemption_check_steps: int = setting(
        0,
        "On SIGTERM/SIGUSR1, all processes agree to stop at the next multiple of N steps "
        "(several processes: one small collective per N steps, which waits for the device), "
        "checkpoint and exit 75. 0: every step with one process, every 20 with several.",
        group="outputs and checkpoints",
    )

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_every_steps > 0 or self.checkpoint_every_epochs > 0

    def validate(self) -> None:
        check_non_negative(
            self,
            "preemption_check_steps",
            "checkpoint_every_steps",
            "checkpoint_every_epochs",
            "keep_checkpoints",
            "keep_checkpoint_every_steps",
        )
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ValueError(
                f"--workdir={self.workdir} is a file, not a folder; use another --workdir"
            )


# Config's fields are its groups' (a dataclass collects base fields from the last base to the
# first: this order keeps config.json and --help in the order data, model, training, ...).
@dataclasses.dataclass(frozen=True)
class Config(
    OutputSettings,
    EvalSettings,
    NPSettings,
    DecorrelationSettings,
    CrashGuardSettings,
    OptimSettings,
    TrainingSettings,
    ModelSettings,
    DataSettings,
):
    """Every setting of a run, flat (`Config(network="fc", lr=0.1)`, one flag per field); each
    concern's part, the object its code receives, is a property (`cfg.np`, `cfg.model`, ...)."""

    @property
    def data(self) -> DataSettings:
        return project(self, DataSettings)

    @property
    def model(self) -> ModelSettings:
        return project(self, ModelSettings)

    @property
    def training(self) -> TrainingSettings:
        return project(self, TrainingSettings)

    @property
    def optim(self) -> OptimSettings:
        return project(self, OptimSettings)

    @property
    def crash(self) -> CrashGuardSettings:
        return project(self, CrashGuardSettings)

    @property
    def decorrelation(self) -> DecorrelationSettings:
        return project(self, DecorrelationSettings)

    @property
    def np(self) -> NPSettings:
        return project(self, NPSettings)

    @property
    def eval(self) -> EvalSettings:
        return project(self, EvalSettings)

    @property
    def outputs(self) -> OutputSettings:
        return project(self, OutputSettings)

    def resolved(self) -> Config:
        sigma = self.sigma
        if sigma is None:
            sigma = precision.default_sigma(self.network, self.dtype, self.precision)
        return dataclasses.replace(self, sigma=float(sigma))

    def validate(self) -> None:
        """One-line errors for bad settings, before anything is loaded or compiled: each group's
        own checks, then those that span groups."""
        for group in (
            self.data,
            self.model,
            self.training,
            self.np,
            self.crash,
            self.eval,
            self.outputs,
        ):
            group.validate()
        self.optim.validate(self.num_epochs)
        self.decorrelation.validate(self.network)
        population.check(self)  # each member's settings, as its solo run would check them
        if self.update_rule == "np":  # on a GPU, TF32's floor too: the one backend read
            precision.check_sigma(
                network=self.network,
                dtype=self.dtype,
                precision=self.precision,
                sigma=self.sigma,
                np_delta=self.np_delta,
            )


# ----------------------------------------------------------------------------- presets

PRESETS = presets_lib.PRESETS  # `--config=NAME` (presets.py: every preset, one place)


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
        raise ValueError(
            f"--config={name_or_path} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"--config={name_or_path}: unknown setting(s) {', '.join(unknown)}")
    return dict(values)


# ----------------------------------------------------------------------------- flags

_DEFINE = {
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    str: flags.DEFINE_string,
}


def define_flags(cls=Config) -> None:
    """One absl flag per field of `cls`: its type, default, help text, choices and group."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional
        meta = f.metadata
        if meta["choices"] is not None:
            flags.DEFINE_enum(
                f.name, f.default, list(meta["choices"]), meta["help"], module_name=meta["group"]
            )
        else:
            _DEFINE[kind](f.name, f.default, meta["help"], module_name=meta["group"])


define_flags()
flags.DEFINE_string(
    "config",
    None,
    "A preset (" + ", ".join(PRESETS) + ") or a JSON file of "
    "settings; flags given on the command line override it.",
    module_name="settings",
)
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "If > 0, simulate this many CPU devices (tests the "
    "multi-device path on a CPU; slower than 1 device there).",
    module_name="machine",
)
flags.DEFINE_bool(
    "xla_cpu_conv_flag",
    True,
    "On CPU, add the measured XLA flag for faster "
    "convolutions unless XLA_FLAGS already sets that option.",
    module_name="machine",
)
flags.DEFINE_bool(
    "deterministic",
    False,
    "On GPU, XLA's deterministic ops: run-to-run identical, somewhat slower (CPU: a no-op).",
    module_name="machine",
)
flags.DEFINE_string(
    "compilation_cache_dir",
    "",
    "A folder all processes and attempts share for compiled programs and GPU autotuning.",
    module_name="machine",
)
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


USAGE = """nodepert-train: node perturbation (or SGD) training on every device of the job.

Writes config.json, metrics.jsonl and metrics.csv into --workdir, checkpoints into
<workdir>/checkpoints, and resumes from them when started again with the same command.
Example:  nodepert-train --config=mnist_fc_np --workdir=runs/np"""


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` of nodepert-train: grouped --help, one-line flag errors."""
    groups = {g: CLUSTER_MODULE if g == "cluster" else g for g in GROUPS}
    return cli.parse_flags(argv, "nodepert-train", USAGE, groups)
