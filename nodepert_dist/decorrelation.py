"""Input decorrelation (--decorrelate): a learned matrix R in front of each layer's weights.

As in Dalm et al. ("effective learning with node perturbation", after Ahmad et al.'s
decorrelated backprop), each layer computes W (R x) instead of W x, and R learns by its own
local rule, never by NP or backprop:

    R <- R - lr * offdiag(E[x' x'^T]) R,    x' = R x,

E the mean over the GLOBAL batch (and over positions, for a conv layer, whose R mixes the
input channels: a 1x1 decorrelation). The rule drives the off-diagonal second moments of x' to
zero and leaves the diagonal alone: no variance-normalising term, so each input keeps its scale
and the weights' init scale and NP's sigma keep their meaning (whitening would blow up the
near-constant inputs, e.g. MNIST's border pixels, by their tiny variance).

The matrices live in the flax collection DECOR (TrainState.decor: checkpointed like the params).
To the estimator and to SGD they are constants: `bind` closes the model over them, and
`Decorrelate` stops their gradient, so NP and backprop estimate dW with R fixed.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from nodepert_dist import settings as settings_lib
from nodepert_dist.settings import setting

DECOR, STATS = "decorrelation", "decorrelation_stats"
NETWORKS = ("fc", "linfc", "conv", "conv-large")  # the models that place a Decorrelate


class Decorrelate(nn.Module):
    """x' = R x over the last axis (the features, or a conv input's channels); R starts as I.

    With STATS mutable it also records this device's share of the rule's update, summed over
    its rows, `offdiag(X'^T X') R` computed as X'^T (X' R) - diag(X'^T X') R (2 n d^2 flops,
    not d^3), and the row count, for `update`."""

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        r = jax.lax.stop_gradient(
            self.variable(DECOR, "R", lambda: jnp.eye(d, dtype=jnp.float32)).value
        )
        y = jnp.einsum("...i,ji->...j", x, r.astype(x.dtype))
        if self.is_mutable_collection(STATS) and not self.is_initializing():
            rows = y.reshape(-1, d).astype(jnp.promote_types(y.dtype, r.dtype))  # bf16 -> f32
            moved = rows.T @ (rows @ r) - jnp.sum(rows * rows, 0)[:, None] * r
            self.put_variable(STATS, "sum", moved)
            self.put_variable(STATS, "count", jnp.float32(rows.shape[0]))
        return y


class _Bound:
    """`model` whose `apply` adds the decorrelation matrices to the variables it is given."""

    def __init__(self, model, matrices):
        self.model, self.matrices = model, matrices

    def apply(self, variables, *args, **kwargs):
        return self.model.apply({**variables, DECOR: self.matrices}, *args, **kwargs)

    def __getattr__(self, name):  # init, clone, ...: the model's own
        if name == "model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def bind(model, matrices):
    """The model with its matrices fixed (a constant to jax.grad and jax.vjp of the params);
    the model itself when `matrices` is None (no --decorrelate)."""
    return model if matrices is None else _Bound(model, matrices)


def local_sums(model, params, matrices, x) -> dict:
    """{Decorrelate path: {"sum", "count"}} of this device's examples (one clean forward)."""
    _, state = model.apply({"params": params, DECOR: matrices}, x, mutable=[STATS])
    return state[STATS]


def update(matrices, sums, lr: float):
    """The rule's step from the GLOBAL sums (psum'ed over the data axis): R - lr * mean."""
    flat_sums = traverse_util.flatten_dict(dict(sums))
    flat = traverse_util.flatten_dict(dict(matrices))
    return traverse_util.unflatten_dict(
        {
            path: r - lr * flat_sums[path[:-1] + ("sum",)] / flat_sums[path[:-1] + ("count",)]
            for path, r in flat.items()
        }
    )


def check(network: str) -> None:
    """One line for a network without Decorrelate sites."""
    if network not in NETWORKS:
        raise ValueError(
            f"--decorrelate is built for --network={', '.join(NETWORKS)}, not "
            f"--network={network}; drop --decorrelate"
        )


@dataclasses.dataclass(frozen=True)
class DecorrelationSettings:
    """--decorrelate and its rate; part of config.Config."""

    decorrelate: bool = setting(
        False,
        "fc/linfc/conv/conv-large: a learned matrix R "
        "decorrelates each layer's input (conv: its channels) before the "
        "weights, by its own local rule R <- R - lr_d * offdiag(E[x'x'^T]) "
        "R (Dalm et al.); NP or SGD train the weights with R fixed.",
        group="training",
    )
    decorrelate_lr: float = setting(
        1e-4, "--decorrelate: the learning rate lr_d of R's rule.", group="training"
    )

    def validate(self, network: str) -> None:
        if self.decorrelate:
            check(network)
            if not self.decorrelate_lr > 0:
                raise ValueError(f"--decorrelate_lr={self.decorrelate_lr:g} must be positive")
        elif self.decorrelate_lr != settings_lib.default(DecorrelationSettings, "decorrelate_lr"):
            raise ValueError(
                "--decorrelate_lr is the rate of --decorrelate's matrices; give "
                "--decorrelate too, or drop --decorrelate_lr"
            )
