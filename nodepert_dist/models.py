"""The networks: flax modules with a node tap at every pre-activation.

Every network is a stack of linear maps (Dense or Conv), each followed by a *node tap* where
node perturbation injects its noise, then the nonlinearity. The module returns the logits, the
tapped pre-activations and every layer's input, so the NP estimator can reuse a forward pass.

`layer_inputs=[...]` feeds each linear map a given (gradient-stopped) input instead of the
previous layer's output: the VJP of that call is each layer's own weight-gradient op and nothing
else (no backward chain through the network), which is the NP update of DESIGN.md section 2.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NETWORKS = ("fc", "linfc", "conv", "conv-large")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One linear map of the stack: a dense layer or a SAME-padded convolution."""

    kind: str  # "dense" or "conv"
    features: int
    kernel: int = 1
    stride: int = 1


class TappedNetwork(nn.Module):
    """Linear maps, each followed by a node tap (noise is added there) and the activation.

    The last layer is the readout: its pre-activation is the logits and gets no activation.
    Convolutional inputs are flattened before the first dense layer.
    """

    layers: Sequence[Layer]
    activation: str = "relu"  # "relu" or "linear"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, noise=None, layer_inputs=None):
        """Returns (logits, pre-activations, layer inputs), one entry per linear map."""
        init = nn.initializers.xavier_normal()
        preacts, inputs = [], []
        h = x
        for i, layer in enumerate(self.layers):
            if layer_inputs is not None:
                h = jax.lax.stop_gradient(layer_inputs[i])
            if layer.kind == "dense":
                h = h.reshape(h.shape[0], -1)
                linear = nn.Dense(layer.features, kernel_init=init, dtype=self.dtype, name=f"layer{i}")
            else:
                linear = nn.Conv(layer.features, (layer.kernel, layer.kernel), strides=layer.stride,
                                 padding="SAME", kernel_init=init, dtype=self.dtype, name=f"layer{i}")
            inputs.append(h)
            a = linear(h)
            if noise is not None:
                a = a + noise[i].astype(a.dtype)
            preacts.append(a)
            is_readout = i == len(self.layers) - 1
            h = a if (is_readout or self.activation == "linear") else nn.relu(a)
        return preacts[-1], preacts, inputs


def layer_stack(network: str, num_classes: int, n_hl: int = 2, hl_size: int = 500) -> tuple[Layer, ...]:
    """The original research code's architectures (DESIGN.md section 7)."""
    if network in ("fc", "linfc"):
        hidden = [Layer("dense", hl_size) for _ in range(n_hl)]
    elif network == "conv":
        hidden = [Layer("conv", 32, 3, 1), Layer("conv", 32, 3, 2), Layer("conv", 32, 3, 1)]
    elif network == "conv-large":
        hidden = [Layer("conv", 96, 5, 1), Layer("conv", 96, 3, 2), Layer("conv", 192, 5, 1),
                  Layer("conv", 192, 3, 2), Layer("conv", 192, 3, 1), Layer("conv", 192, 1, 1),
                  Layer("conv", 10, 1, 1)]
    else:
        raise ValueError(f"unknown --network={network!r}; choose one of {', '.join(NETWORKS)}")
    return tuple(hidden) + (Layer("dense", num_classes),)


def build_model(network: str, num_classes: int, n_hl: int = 2, hl_size: int = 500) -> TappedNetwork:
    activation = "linear" if network == "linfc" else "relu"
    return TappedNetwork(layer_stack(network, num_classes, n_hl, hl_size), activation=activation)


def default_sigma(network: str) -> float:
    """Noise scale of the original code: 1e-4 for dense nets, 1e-5 for conv nets."""
    return 1e-5 if network.startswith("conv") else 1e-4
