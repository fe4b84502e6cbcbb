"""The model zoo: ordinary flax linen modules with a `Tap` after every pre-activation.

fc, linfc, conv and conv-large are the original code's networks (docs/design/original_code.md);
vgg, vgg16, resnet (ResNet-18) and resnet34 are the large conv nets, for 32x32x3 (and 28x28x1)
inputs. None uses batch
norm: batch statistics mix examples, which biases per-example NP (taps.check says so). Every
model returns logits; `taps.py` runs them noisy or in replay for the NP estimator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nodepert_dist import decorrelation
from nodepert_dist import precision as precision_lib
from nodepert_dist import settings as settings_lib
from nodepert_dist.decorrelation import Decorrelate
from nodepert_dist.settings import setting
from nodepert_dist.taps import Tap

NETWORKS = ("fc", "linfc", "conv", "conv-large", "vgg", "vgg16", "resnet", "resnet34")
NORMS = ("none", "group", "layer")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The network's settings (`build`); part of config.Config."""

    network: str = setting("fc", "Architecture.", group="model", choices=NETWORKS)
    n_hl: int = setting(2, "Hidden layers of fc/linfc.", group="model")
    hl_size: int = setting(500, "Units per hidden layer of fc/linfc.", group="model")
    width: int = setting(
        64,
        "vgg/vgg16/resnet/resnet34: channels of the first stage (64 is "
        "VGG/ResNet-18/34; later stages have 2x, 4x, 8x).",
        group="model",
    )
    norm: str = setting(
        "none",
        "vgg/vgg16/resnet/resnet34: per-example normalisation before each tap (batch norm "
        "would bias NP).",
        group="model",
        choices=NORMS,
    )
    dtype: str = setting(
        "float32",
        "Compute dtype of matmuls and convs; parameters, optimizer "
        "state and loss differences stay float32.",
        group="model",
        choices=tuple(DTYPES),
    )
    precision: str = setting(
        "highest",
        "Precision of float32 matmuls and convs, NP and SGD alike (jax.lax.Precision): "
        "highest is float32 everywhere; default/high are TF32 on Ampere/Hopper GPUs, faster "
        "but with a sigma floor there (docs/results/tf32_sigma.md). CPUs ignore it.",
        group="model",
        choices=precision_lib.PRECISIONS,
    )

    def validate(self) -> None:
        settings_lib.check_choices(self)
        settings_lib.check_positive(self, "hl_size", "width")
        settings_lib.check_non_negative(self, "n_hl")


def _at_precision(call):
    """A network's __call__ traced under jax.default_matmul_precision(self.precision): every
    matmul and conv inside (layers, Decorrelate's einsums) and those autodiff derives from them
    (SGD's backward pass, NP's replay VJP) carry it."""

    @functools.wraps(call)
    def traced(self, *args, **kwargs):
        with jax.default_matmul_precision(self.precision):
            return call(self, *args, **kwargs)

    return traced


_xavier = nn.initializers.xavier_normal()
_he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class MLP(nn.Module):
    """Dense layers (layer0, layer1, ...), each with a tap; the last is the readout.

    `local_heads` (--np_local): after each hidden layer i an auxiliary linear readout `head{i}`
    with its own tap `head_tap{i}` (its logits, read by the estimator, unused by the network),
    and the next layer's input is stop-gradient'ed, so that jax.grad of the sum of the blocks'
    losses is each block's local gradient (the reference of the Monte-Carlo test).
    `decorrelate` (--decorrelate): `decor{i}` decorrelates layer i's input
    (head i reads layer i+1's decorrelated input)."""

    widths: Sequence[int]
    activation: str = "relu"  # "relu" or "linear" (linfc)
    dtype: jnp.dtype = jnp.float32
    precision: str = "highest"  # ModelSettings.precision
    local_heads: bool = False
    decorrelate: bool = False

    @nn.compact
    @_at_precision
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        if self.decorrelate:
            h = Decorrelate(name="decor0")(h)
        for i, width in enumerate(self.widths):
            h = Tap(name=f"tap{i}")(
                nn.Dense(width, kernel_init=_xavier, dtype=self.dtype, name=f"layer{i}")(h)
            )
            if i < len(self.widths) - 1 and self.activation == "relu":
                h = nn.relu(h)
            if self.decorrelate and i < len(self.widths) - 1:
                h = Decorrelate(name=f"decor{i + 1}")(h)
            if self.local_heads and i < len(self.widths) - 1:
                Tap(name=f"head_tap{i}")(
                    nn.Dense(
                        self.widths[-1], kernel_init=_xavier, dtype=self.dtype, name=f"head{i}"
                    )(h)
                )
                h = jax.lax.stop_gradient(h)
        return h


class ConvStack(nn.Module):
    """The original code's conv nets: SAME convolutions (features, kernel, stride), each with a
    tap and a ReLU, then a dense readout with a tap. `decorrelate`: `decor{i}` decorrelates
    layer i's input channels (1x1; the readout's too, before the flattening). `local_heads`
    (--np_local): after each convolution i a linear readout `head{i}` of its spatially averaged
    output (what the next layer reads), tapped `head_tap{i}`, and a stop-gradient, as MLP's."""

    convs: Sequence[tuple[int, int, int]]
    num_classes: int
    dtype: jnp.dtype = jnp.float32
    precision: str = "highest"  # ModelSettings.precision
    decorrelate: bool = False
    local_heads: bool = False

    @nn.compact
    @_at_precision
    def __call__(self, x):
        decor = (
            (lambda i, h: Decorrelate(name=f"decor{i}")(h))
            if self.decorrelate
            else (lambda i, h: h)
        )
        h = decor(0, x)
        for i, (features, k, stride) in enumerate(self.convs):
            conv = nn.Conv(
                features,
                (k, k),
                strides=stride,
                padding="SAME",
                kernel_init=_xavier,
                dtype=self.dtype,
                name=f"layer{i}",
            )
            h = decor(i + 1, nn.relu(Tap(name=f"tap{i}")(conv(h))))  # the next layer's input
            if self.local_heads:
                head = nn.Dense(
                    self.num_classes, kernel_init=_xavier, dtype=self.dtype, name=f"head{i}"
                )
                Tap(name=f"head_tap{i}")(head(jnp.mean(h, axis=(1, 2))))
                h = jax.lax.stop_gradient(h)
        n = len(self.convs)
        readout = nn.Dense(
            self.num_classes, kernel_init=_xavier, dtype=self.dtype, name=f"layer{n}"
        )
        return Tap(name=f"tap{n}")(readout(h.reshape(h.shape[0], -1)))


def _norm(kind: str, dtype, name: str, zero_scale: bool = False):
    """Per-example normalisation (never batch norm), or None."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if kind == "group":
        return lambda h: nn.GroupNorm(
            num_groups=math.gcd(h.shape[-1], 32), scale_init=scale_init, dtype=dtype, name=name
        )(h)
    if kind == "layer":
        return lambda h: nn.LayerNorm(scale_init=scale_init, dtype=dtype, name=name)(h)
    return None


class ConvUnit(nn.Module):
    """conv -> optional norm -> Tap: one perturbed pre-activation."""

    features: int
    kernel: int = 3
    stride: int = 1
    norm: str = "none"
    zero_init: bool = False  # residual-branch scaling: the branch starts as zero
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        norm = _norm(self.norm, self.dtype, "norm", self.zero_init)
        kernel_init = nn.initializers.zeros if (self.zero_init and norm is None) else _he
        h = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding="SAME",
            use_bias=norm is None,
            kernel_init=kernel_init,
            dtype=self.dtype,
            name="conv",
        )(h)
        if norm is not None:
            h = norm(h)
        return Tap(name="tap")(h)


# VGG layouts in units of `width` channels; "M" is a 2x2 max-pool.
VGG_LAYOUTS = {
    "vgg": (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),  # VGG-11
    "vgg16": (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
}


class VGG(nn.Module):
    """VGG-style: 3x3 conv units with max-pooling (SAME, so 28x28 inputs work), dense readout."""

    layout: Sequence
    num_classes: int
    width: int = 64
    norm: str = "none"
    dtype: jnp.dtype = jnp.float32
    precision: str = "highest"  # ModelSettings.precision

    @nn.compact
    @_at_precision
    def __call__(self, x):
        h, i = x, 0
        for item in self.layout:
            if item == "M":
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
            else:
                h = nn.relu(
                    ConvUnit(item * self.width, norm=self.norm, dtype=self.dtype, name=f"conv{i}")(
                        h
                    )
                )
                i += 1
        readout = nn.Dense(self.num_classes, kernel_init=_xavier, dtype=self.dtype, name="readout")
        return Tap(name="readout_tap")(readout(h.reshape(h.shape[0], -1)))


class BasicBlock(nn.Module):
    """Two 3x3 conv units and a shortcut (a tapped 1x1 conv unit where the shape changes)."""

    features: int
    stride: int = 1
    norm: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(ConvUnit, self.features, norm=self.norm, dtype=self.dtype)
        h = nn.relu(unit(stride=self.stride, name="unit1")(x))
        h = unit(zero_init=True, name="unit2")(h)
        if self.stride != 1 or x.shape[-1] != self.features:
            # Tapped, so its parameters reach its own tap only, not every later tap through
            # the identity shortcuts (that would still be unbiased, but repeats its weight-
            # gradient op once per later tap).
            x = unit(kernel=1, stride=self.stride, name="shortcut")(x)
        return nn.relu(h + x)


class ResNet(nn.Module):
    """ResNet-18-style CIFAR variant: 3x3 stem, 4 stages of `blocks` basic blocks (2 each:
    ResNet-18; RESNET_BLOCKS), average pool."""

    num_classes: int
    width: int = 64
    norm: str = "none"
    blocks: Sequence[int] = (2, 2, 2, 2)
    dtype: jnp.dtype = jnp.float32
    precision: str = "highest"  # ModelSettings.precision

    @nn.compact
    @_at_precision
    def __call__(self, x):
        h = nn.relu(ConvUnit(self.width, norm=self.norm, dtype=self.dtype, name="stem")(x))
        for stage, n in enumerate(self.blocks):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                h = BasicBlock(
                    self.width * 2**stage,
                    stride,
                    self.norm,
                    self.dtype,
                    name=f"stage{stage}_block{b}",
                )(h)
        h = jnp.mean(h, axis=(1, 2))
        readout = nn.Dense(self.num_classes, kernel_init=_xavier, dtype=self.dtype, name="readout")
        return Tap(name="readout_tap")(readout(h))


RESNET_BLOCKS = {"resnet": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # basic blocks per stage

_CONV_STACKS = {
    "conv": ((32, 3, 1), (32, 3, 2), (32, 3, 1)),
    "conv-large": (
        (96, 5, 1),
        (96, 3, 2),
        (192, 5, 1),
        (192, 3, 2),
        (192, 3, 1),
        (192, 1, 1),
        (10, 1, 1),
    ),
}


def build_model(
    network: str,
    num_classes: int,
    n_hl: int = 2,
    hl_size: int = 500,
    *,
    width: int = 64,
    norm: str = "none",
    dtype: str = "float32",
    precision: str = "highest",
    local_heads: bool = False,
    decorrelate: bool = False,
) -> nn.Module:
    """The named network. n_hl and hl_size shape fc/linfc; width and norm shape vgg/resnet;
    local_heads (fc, linfc, conv, conv-large): an auxiliary readout per hidden layer (--np_local);
    decorrelate: a Decorrelate before each layer (decorrelation.NETWORKS only)."""
    if network not in NETWORKS:
        raise ValueError(f"unknown --network={network!r}; choose one of {', '.join(NETWORKS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown --norm={norm!r}; choose one of {', '.join(NORMS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    if precision not in precision_lib.PRECISIONS:
        raise ValueError(
            f"unknown --precision={precision!r}; choose one of {', '.join(precision_lib.PRECISIONS)}"
        )
    dt = DTYPES[dtype]
    if local_heads and network not in ("fc", "linfc", *_CONV_STACKS):
        raise ValueError(
            f"--np_local is built for fc, linfc, conv and conv-large, not --network={network}"
        )
    if decorrelate:
        decorrelation.check(network)
    if network in ("fc", "linfc"):
        return MLP(
            (hl_size,) * n_hl + (num_classes,),
            activation="linear" if network == "linfc" else "relu",
            dtype=dt,
            precision=precision,
            local_heads=local_heads,
            decorrelate=decorrelate,
        )
    if network in _CONV_STACKS:
        return ConvStack(
            _CONV_STACKS[network],
            num_classes,
            dtype=dt,
            precision=precision,
            decorrelate=decorrelate,
            local_heads=local_heads,
        )
    if network in VGG_LAYOUTS:
        return VGG(VGG_LAYOUTS[network], num_classes, width, norm, dt, precision)
    return ResNet(num_classes, width, norm, RESNET_BLOCKS[network], dtype=dt, precision=precision)


def build(
    model: ModelSettings, num_classes: int, *, local_heads: bool = False, decorrelate: bool = False
) -> nn.Module:
    """`build_model` of a run's model settings."""
    return build_model(
        model.network,
        num_classes,
        model.n_hl,
        model.hl_size,
        width=model.width,
        norm=model.norm,
        dtype=model.dtype,
        precision=model.precision,
        local_heads=local_heads,
        decorrelate=decorrelate,
    )
