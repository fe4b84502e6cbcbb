"""Training aids for any update rule, as optax pieces: learning-rate schedules and weight norms.

`step.make_optimizer` chains them: clip (global norm) -> sgd/adam with the schedule -> decoupled
weight decay -> `keep_kernel_norms` (last, because it needs the final new weights).

The schedule reads the train state's step (`scale_by_lr`, given `step=` at each update) rather
than a counter of its own: the lr at a step is a pure function of the settings, so a resumed
run can change the schedule without any optimizer state to carry or reset.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "step")


def lr_schedule(kind: str, lr: float, *, total_steps: int, warmup_steps: int = 0,
                decay_every: int = 0, decay_factor: float = 0.1):
    """`lr` itself (constant, no warm-up: optax then builds exactly the plain optimizer), or an
    optax schedule: linear warm-up from 0 over `warmup_steps`, then constant, cosine decay to 0
    at `total_steps`, or step decay (x `decay_factor` every `decay_every` steps)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown --lr_schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind == "step" and decay_every <= 0:
        raise ValueError("--lr_schedule=step needs --lr_decay_epochs > 0")
    if kind == "constant" and not warmup_steps:
        return lr
    main = {"constant": lambda: optax.constant_schedule(lr),
            "cosine": lambda: optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1)),
            "step": lambda: optax.exponential_decay(lr, decay_every, decay_factor,
                                                    staircase=True)}[kind]()
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main],
                                [warmup_steps])


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
