"""The optimizer of a run: its settings (`OptimSettings`), `make_optimizer` and the training aids
for any update rule as optax pieces (learning-rate schedules, weight norms).

`make_optimizer` chains them: clip (global norm) -> sgd/adam with the schedule -> decoupled
weight decay -> `keep_kernel_norms` (last, because it needs the final new weights).

The schedule reads the train state's step (`scale_by_lr`, given `step=` at each update) rather
than a counter of its own: the lr at a step is a pure function of the settings, so a resumed
run can change the schedule without any optimizer state to carry or reset.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nodepert_dist import settings as settings_lib
from nodepert_dist.settings import setting

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "adam")
_T = "training"


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The optimizer's settings (`optimizer_from`); part of config.Config."""

    lr: float = setting(1e-2, "Learning rate.", group=_T)
    wd: float = setting(0.0, "Decoupled weight decay: w <- w - lr*u(dw) - wd*w.", group=_T)
    optimizer: str = setting("sgd", "Optimizer.", group=_T, choices=OPTIMIZERS)
    lr_schedule: str = setting(
        "constant",
        "lr over training: constant, cosine (decays to 0 "
        "over --lr_schedule_epochs) or step (x --lr_decay_factor every "
        "--lr_decay_epochs).",
        group=_T,
        choices=SCHEDULES,
    )
    lr_schedule_epochs: int = setting(
        0,
        "--lr_schedule=cosine: epochs until the lr reaches 0 "
        "(0: --num_epochs of the run's first start; a resumed run "
        "keeps the recorded value).",
        group=_T,
    )
    warmup_epochs: float = setting(
        0.0, "Linear lr warm-up from 0 over this many epochs, before --lr_schedule.", group=_T
    )
    lr_decay_epochs: int = setting(0, "--lr_schedule=step: decay every N epochs.", group=_T)
    lr_decay_factor: float = setting(
        0.1, "--lr_schedule=step: multiply lr by this at each decay.", group=_T
    )
    clip_norm: float = setting(
        0.0,
        "If > 0, clip the update's global norm (all layers) to this before the optimizer.",
        group=_T,
    )
    weight_norm: bool = setting(
        False,
        "After each update, rescale every kernel to its initial "
        "norm (weight normalisation against NP's weight diffusion, "
        "Hiratani et al. 2022).",
        group=_T,
    )

    def validate(self, num_epochs: int) -> None:
        """One-line errors, including schedule settings that cannot take effect in a run of
        `num_epochs` epochs or that the chosen schedule ignores."""
        settings_lib.check_choices(self)
        settings_lib.check_positive(self, "lr")
        settings_lib.check_non_negative(
            self, "wd", "warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "clip_norm"
        )
        if self.lr_schedule == "step" and not self.lr_decay_epochs:
            raise ValueError("--lr_schedule=step needs --lr_decay_epochs > 0")
        kind, warmup, n = self.lr_schedule, self.warmup_epochs, num_epochs
        horizon = self.lr_schedule_epochs or n
        if kind != "cosine" and self.lr_schedule_epochs:
            raise ValueError(
                f"--lr_schedule_epochs={self.lr_schedule_epochs} is the cosine "
                f"schedule's length; --lr_schedule={kind} ignores it: drop it"
            )
        factor_default = settings_lib.default(OptimSettings, "lr_decay_factor")
        if kind != "step" and (self.lr_decay_epochs or self.lr_decay_factor != factor_default):
            raise ValueError(
                f"--lr_decay_epochs and --lr_decay_factor apply to "
                f"--lr_schedule=step only; --lr_schedule={kind} ignores them: "
                f"drop them or use --lr_schedule=step"
            )
        if kind == "step" and not 0 < self.lr_decay_factor < 1:
            raise ValueError(
                f"--lr_decay_factor={self.lr_decay_factor:g} must be in (0, 1): "
                + (
                    "it would make the lr grow"
                    if self.lr_decay_factor >= 1
                    else "the lr would be 0 after the first decay"
                )
            )
        if kind == "step" and warmup + self.lr_decay_epochs >= n:
            raise ValueError(
                f"--lr_decay_epochs={self.lr_decay_epochs}: the first decay comes "
                f"after epoch {warmup + self.lr_decay_epochs:g}, not inside the "
                f"run's --num_epochs={n}; use a smaller --lr_decay_epochs"
            )
        if kind == "cosine" and n > horizon:
            raise ValueError(
                f"--num_epochs={n} goes past the cosine schedule's {horizon} epochs "
                f"(--lr_schedule_epochs, kept from the run's first start), where "
                f"its lr is 0; to train on, also give --lr_schedule_epochs={n} "
                f"(the cosine is then recomputed over {n} epochs)"
            )
        if warmup and warmup >= (horizon if kind == "cosine" else n):
            length = (
                f"the cosine schedule's {horizon} epochs"
                if kind == "cosine"
                else f"--num_epochs={n}"
            )
            raise ValueError(
                f"--warmup_epochs={warmup:g} does not end inside {length}: the lr "
                f"would never reach --lr; use fewer warm-up epochs"
            )


def lr_schedule(
    kind: str,
    lr: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay_every: int = 0,
    decay_factor: float = 0.1,
):
    """`lr` itself (constant, no warm-up: optax then builds exactly the plain optimizer), or an
    optax schedule: linear warm-up from 0 over `warmup_steps`, then constant, cosine decay to 0
    at `total_steps`, or step decay (x `decay_factor` every `decay_every` steps)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown --lr_schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind == "step" and decay_every <= 0:
        raise ValueError("--lr_schedule=step needs --lr_decay_epochs > 0")
    if kind == "constant" and not warmup_steps:
        return lr
    main = {
        "constant": lambda: optax.constant_schedule(lr),
        "cosine": lambda: optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1)),
        "step": lambda: optax.exponential_decay(lr, decay_every, decay_factor, staircase=True),
    }[kind]()
    if not warmup_steps:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps]
    )


def scale_by_lr(rate) -> optax.GradientTransformationExtraArgs:
    """`-rate * update`, `rate` a float or a schedule of the step given as `update(..., step=)`
    (the train state's step). Stateless; a float gives optax's own `scale_by_learning_rate`."""
    if not callable(rate):
        return optax.scale_by_learning_rate(rate)

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError("an lr schedule needs the step: call update(..., step=state.step)")
        return jax.tree.map(lambda g: jnp.asarray(-rate(step), g.dtype) * g, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.ScaleState(), update)


class KernelNorms(NamedTuple):
    """The initial norm of every parameter (used for kernels only)."""

    norms: optax.Params


def keep_kernel_norms() -> optax.GradientTransformation:
    """Weight normalisation (Hiratani et al. 2022, against NP's weight diffusion): after each
    update, every kernel (a parameter with >= 2 axes) is rescaled to its initial Frobenius norm,
    per layer; biases are left alone. The update rule then moves only kernel directions.

    A kernel whose initial norm is 0 (ResNet's last conv of each residual branch starts at zero)
    has no norm to hold: it trains unconstrained, as does a kernel the update has zeroed."""

    def init(params):
        return KernelNorms(jax.tree.map(lambda p: jnp.linalg.norm(p.astype(jnp.float32)), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_kernel_norms needs the parameters")

        def project(u, p, n0):
            if p.ndim < 2:
                return u
            new = p + u
            norm = jnp.linalg.norm(new.astype(jnp.float32))
            # where(), not a division by 0: a zero kernel and a zero update would become NaN
            ratio = jnp.where((n0 > 0) & (norm > 0), n0 / jnp.where(norm > 0, norm, 1.0), 1.0)
            return (new * ratio.astype(new.dtype)) - p

        return jax.tree.map(project, updates, params, state.norms), state

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- the optimizer


def optimizer_parts(
    name: str,
    lr: float,
    wd: float,
    *,
    schedule: str = "constant",
    total_steps: int = 0,
    warmup_steps: int = 0,
    decay_every: int = 0,
    decay_factor: float = 0.1,
    clip_norm: float = 0.0,
    weight_norm: bool = False,
    decay: bool | None = None,
) -> list[tuple[str, optax.GradientTransformation]]:
    """`decay`: whether the "decay" part is there (None: when wd is nonzero; True for a
    --population whose wd is a traced scalar of each member). The named parts `make_optimizer` chains, in order: "clip", the optimizer ("sgd" or
    "adam"), "decay", "weight_norm" (each aid only when asked for). A resumed run carries each
    part's state over by its name (resume.py)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown --optimizer={name!r}; choose one of {', '.join(OPTIMIZERS)}")
    rate = lr_schedule(
        schedule,
        lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_every=decay_every,
        decay_factor=decay_factor,
    )
    # optax.sgd / optax.adam with the lr read from the step (scale_by_lr): the same
    # transformations and state as optax's own with a constant lr.
    scale = optax.identity() if name == "sgd" else optax.scale_by_adam()
    parts = [("clip", optax.clip_by_global_norm(clip_norm))] if clip_norm else []
    parts += [(name, optax.chain(scale, scale_by_lr(rate)))]
    parts += [("decay", optax.add_decayed_weights(-wd))] if (wd if decay is None else decay) else []
    parts += [("weight_norm", keep_kernel_norms())] if weight_norm else []
    return parts


def make_optimizer(name: str, lr: float, wd: float, **aids) -> optax.GradientTransformation:
    """`w <- w - lr * u(dw) - wd * w`, with u the identity (sgd) or Adam's scaling (adam).

    The decay is decoupled and not scaled by lr, as in the original research code, hence the
    negative rate given to optax's add_decayed_weights (which adds +rate * w to the update).
    Training aids (`optimizer_parts`' keywords): `schedule` for lr over `total_steps` (with
    `warmup_steps`, and `decay_every`/`decay_factor` for step decay), `clip_norm` > 0 clips the
    global gradient norm first, `weight_norm` holds every kernel at its initial norm after the
    update. Its `update` takes `step=` (the schedule's step).
    """
    parts = [t for _, t in optimizer_parts(name, lr, wd, **aids)]
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _schedule_args(optim: OptimSettings, num_epochs: int, steps_per_epoch: int) -> dict:
    """The lr schedule settings, its epochs counted in steps."""
    return dict(
        schedule=optim.lr_schedule,
        total_steps=(optim.lr_schedule_epochs or num_epochs) * steps_per_epoch,
        warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
        decay_every=optim.lr_decay_epochs * steps_per_epoch,
        decay_factor=optim.lr_decay_factor,
    )


def schedule_from(optim: OptimSettings, num_epochs: int, steps_per_epoch: int):
    """The lr (a float, or an optax schedule of the step) of these settings."""
    args = _schedule_args(optim, num_epochs, steps_per_epoch)
    return lr_schedule(args.pop("schedule"), optim.lr, **args)


def parts_from(optim: OptimSettings) -> list:
    """`optimizer_parts` of these settings at a constant lr: the part names and state structure
    (the schedule decides no part's state)."""
    return optimizer_parts(
        optim.optimizer,
        optim.lr,
        optim.wd,
        clip_norm=optim.clip_norm,
        weight_norm=optim.weight_norm,
    )


def optimizer_from(
    optim: OptimSettings, num_epochs: int, steps_per_epoch: int, decay: bool | None = None
) -> optax.GradientTransformation:
    """`make_optimizer` of these settings (a cosine without --lr_schedule_epochs spans
    `num_epochs`; `decay`: optimizer_parts')."""
    return make_optimizer(
        optim.optimizer,
        optim.lr,
        optim.wd,
        clip_norm=optim.clip_norm,
        weight_norm=optim.weight_norm,
        decay=decay,
        **_schedule_args(optim, num_epochs, steps_per_epoch),
    )


def part_states(names: list[str], opt_state) -> dict:
    """{part name: its state} of a `make_optimizer` state built from parts `names`."""
    return dict(zip(names, opt_state)) if len(names) > 1 else {names[0]: opt_state}


def join_part_states(names: list[str], states: dict):
    """The inverse of `part_states`."""
    return tuple(states[n] for n in names) if len(names) > 1 else states[names[0]]
