"""Compute precision of matmuls and convolutions (--precision), the sigma floors it implies, and
a CPU emulation of TF32 to measure them.

On Ampere/Hopper GPUs XLA runs float32 matmuls and convolutions at `default` (and `high`)
precision in TF32: operands rounded to 10 mantissa bits, float32 accumulation. NP's finite
loss difference is then rounded like bf16's at 8x finer resolution: below a sigma floor the
noise's effect drowns in rounding (docs/results/tf32_sigma.md). `highest` is true float32 on
every backend; CPUs ignore the setting (float32 always). The bf16 floors (--dtype=bfloat16)
hold everywhere, since bf16 rounds on a CPU too. --np_delta=jvp has no floor: its tangent is
computed, not differenced, so rounding stays relative to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

PRECISIONS = ("default", "high", "highest")  # jax.lax.Precision's names
TF32_PRECISIONS = ("default", "high")  # TF32 on a GPU (jax.lax.Precision's docstring)

# The smallest sigma on the grid 1e-5, 1e-4, 3e-4, 1e-3, 3e-3 at which NP's mean estimate under
# emulated TF32 matched float32's with the same noise (cosine >= 0.99, norm within 15%, every
# leaf) and added at most 10% to the estimator's second moment, measured by
# benchmarks/bf16_sigma.py --compute=tf32 (docs/results/tf32_sigma.md). linfc, conv-large and
# vgg16 take fc's, conv's and vgg's values, resnet34 resnet's (not measured).
TF32_SIGMA_FLOOR = {
    "fc": 3e-3,
    "linfc": 3e-3,
    "conv": 1e-3,
    "conv-large": 1e-3,
    "vgg": 3e-4,
    "vgg16": 3e-4,
    "resnet": 3e-3,
    "resnet34": 3e-3,
}

# The smallest sigma on the grid 3e-3, 1e-2, 3e-2, 1e-1 at which NP's mean estimate in bfloat16
# matched float32's with the same noise (cosine >= 0.99, norm within 15%), measured by
# benchmarks/bf16_sigma.py (docs/results/bf16_sigma.md). bf16 keeps 8 significant bits: smaller
# noise is rounded away at the taps and in the loss change. conv-large and vgg16 take conv's and
# vgg's values (not measured); resnet's is the best of the grid (cosine 0.991, norm 0.95-1.18),
# and resnet34 takes it (not measured).
BF16_SIGMA_FLOOR = {
    "fc": 3e-2,
    "linfc": 3e-2,
    "conv": 1e-2,
    "conv-large": 1e-2,
    "vgg": 3e-3,
    "vgg16": 3e-3,
    "resnet": 3e-2,
    "resnet34": 3e-2,
}


def sigma_floor(network: str, dtype: str, precision: str = "highest") -> float:
    """The smallest sigma NP's finite difference stays unbiased at on a GPU: bf16's floor in
    bfloat16 (on every backend), TF32's at --precision=default/high (a GPU's), else 0."""
    if dtype == "bfloat16":
        return BF16_SIGMA_FLOOR.get(network, 0.0)
    if precision in TF32_PRECISIONS:
        return TF32_SIGMA_FLOOR.get(network, 0.0)
    return 0.0


def backend() -> str:
    """jax's default backend ("cpu", "gpu", "tpu"): the one place the floor check reads it."""
    return jax.default_backend()


def check_sigma(
    *, network: str, dtype: str, precision: str, sigma: float | None, np_delta: str
) -> None:
    """One line for an explicit --sigma below the floor of the compute in use: bf16's anywhere
    (a CPU rounds bf16 too), TF32's on a GPU only (a CPU computes float32 whatever
    --precision says). The default sigma is never below (default_sigma)."""
    floor = sigma_floor(network, dtype, precision)
    if sigma is None or sigma >= floor:
        return
    if dtype == "bfloat16":
        raise ValueError(
            f"--sigma={sigma:g} is below {floor:g}, the smallest sigma at which NP on "
            f"{network} in {dtype} measured unbiased (bf16 rounds smaller noise away); raise "
            f"--sigma or use --dtype=float32"
        )
    # --np_delta=jvp differentiates instead of differencing: TF32 rounds its tangent relative to
    # itself, so it has no floor. The backend is read only when it decides.
    if np_delta != "jvp" and backend() == "gpu":
        raise ValueError(
            f"--sigma={sigma:g} is below {floor:g}, the smallest sigma at which NP on {network} "
            f"measured unbiased in TF32 (--precision={precision} on a GPU); raise --sigma to "
            f"{floor:g} or more, or use --precision=highest"
        )


def default_sigma(network: str, dtype: str = "float32", precision: str = "highest") -> float:
    """1e-4 for dense nets and 1e-5 for the original conv nets (the original code's values);
    1e-4 for vgg/resnet, which the original code never ran (float32 delta precision:
    perturbation.py); raised to the floor of bf16, or of TF32 at --precision=default/high (on
    every backend: a run's sigma does not depend on where it runs)."""
    base = 1e-5 if network.startswith("conv") else 1e-4
    return max(base, sigma_floor(network, dtype, precision))


# ----------------------------------------------------------------------------- TF32 on a CPU

_ROUNDED = ("dot_general", "conv_general_dilated")
_INLINED = {  # call-like primitives: their body runs once, in place
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


def tf32(x):
    """x's float32 values rounded to TF32's 10 mantissa bits (to nearest, ties to even; a GPU's
    conversion may round otherwise, to within the same last bit); other dtypes as they are."""
    if x.dtype != jnp.float32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10)


def emulate_tf32(fn):
    """`fn` with every float32 matmul and convolution computed as a GPU's TF32 does: operands
    rounded to 10 mantissa bits, float32 accumulation. A test and benchmark utility: it
    rewrites fn's jaxpr (jit, custom_jvp/vjp bodies inlined; scan/while/cond bodies rewritten),
    so apply it to a finished computation (gradients inside fn), not under jax.grad. Chosen over
    patching flax's layers because it reaches every dot, also those that autodiff writes (the
    backward pass of SGD, NP's replay VJP) and jnp.einsum's, with no hook in production code."""

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), out)

    return wrapped


def _rewrite(closed):
    """A ClosedJaxpr computing the same under the emulation."""
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    return jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a))(*avals)


def _rewrite_param(value):
    if isinstance(value, jcore.ClosedJaxpr):
        return _rewrite(value)
    if isinstance(value, tuple) and value and all(isinstance(v, jcore.ClosedJaxpr) for v in value):
        return tuple(_rewrite(v) for v in value)
    if isinstance(value, jcore.Jaxpr):
        raise NotImplementedError("emulate_tf32: an open sub-jaxpr (shard_map?); emulate inside it")
    return value


def _eval(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        body = eqn.params.get(_INLINED.get(name, ""))
        if body is not None:
            closed = isinstance(body, jcore.ClosedJaxpr)
            out = _eval(body.jaxpr if closed else body, body.consts if closed else (), invals)
        else:
            if name in _ROUNDED:
                invals = [tf32(invals[0]), tf32(invals[1]), *invals[2:]]
            params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
            with eqn.ctx.manager:  # the context it was traced in (e.g. threefry_partitionable)
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            out = out if eqn.primitive.multiple_results else [out]
        for v, x in zip(eqn.outvars, out):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]
