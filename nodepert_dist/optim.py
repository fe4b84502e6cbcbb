"""Training aids for any update rule, as optax pieces: learning-rate schedules and weight norms.

`step.make_optimizer` chains them: clip (global norm) -> sgd/adam with the schedule -> decoupled
weight decay -> `keep_kernel_norms` (last, because it needs the final new weights).
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


class KernelNorms(NamedTuple):
    """The initial norm of every parameter (used for kernels only)."""
    norms: optax.Params


def keep_kernel_norms() -> optax.GradientTransformation:
    """Weight normalisation (Hiratani et al. 2022, against NP's weight diffusion): after each
    update, every kernel (a parameter with >= 2 axes) is rescaled to its initial Frobenius norm,
    per layer; biases are left alone. The update rule then moves only kernel directions."""

    def init(params):
        return KernelNorms(jax.tree.map(lambda p: jnp.linalg.norm(p.astype(jnp.float32)), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_kernel_norms needs the parameters")

        def project(u, p, n0):
            if p.ndim < 2:
                return u
            new = p + u
            return (new * (n0 / jnp.linalg.norm(new.astype(jnp.float32))).astype(new.dtype)) - p

        return jax.tree.map(project, updates, params, state.norms), state

    return optax.GradientTransformation(init, update)
