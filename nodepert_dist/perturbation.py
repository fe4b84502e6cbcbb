"""Perturbation noise streams and the node-perturbation (NP) gradient estimator.

Noise keys are counter-based: key(seed) -> fold_in(step) -> fold_in(global example index) ->
fold_in(layer). A device draws only the noise of the examples it holds, with no communication,
and the noise of an example does not depend on how the batch is laid out over devices.

The estimator (DESIGN.md section 2), for a batch of B examples:

    delta_i = L_i(noisy) - L_i(clean)                          one scalar per example
    g_l     = (1/B) sum_i (delta_i / sigma) J_{W_l}[f_l](h~_{l-1,i})^T xi_{l,i}

computed as one VJP of every layer's own linear map at its noisy input, so each layer only does
its own weight-gradient op. Per-example delta_i is essential: a batch-mean delta times
per-example terms is biased.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NOISE_KINDS = ("gaussian", "rademacher")


def example_keys(seed: int, step, global_index):
    """One PRNG key per example, from (seed, step, global example index)."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(global_index)


def _rademacher(key, shape):
    # 32 signs from every random uint32: ~15x cheaper on CPU than threefry normals (DESIGN.md 4).
    n = 1
    for d in shape:
        n *= d
    words = jax.random.bits(key, ((n + 31) // 32,), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (bits.reshape(-1)[:n].astype(jnp.float32) * 2.0 - 1.0).reshape(shape)


def draw_noise(keys, shapes, kind: str = "gaussian"):
    """Unit-variance, zero-mean noise for every node: a list (one per layer) of (b, *shape)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown --noise={kind!r}; choose one of {', '.join(NOISE_KINDS)}")

    def one(key, layer, shape):
        key = jax.random.fold_in(key, layer)
        if kind == "gaussian":
            return jax.random.normal(key, shape, jnp.float32)
        return _rademacher(key, shape)

    return [jax.vmap(lambda k, l=l, s=s: one(k, l, s))(keys) for l, s in enumerate(shapes)]


def np_gradient(apply_fn, params, x, labels, loss_fn, *, sigma: float, keys, normalizer,
                noise_kind: str = "gaussian"):
    """NP estimate of the gradient of the mean loss, summed over these examples / `normalizer`.

    apply_fn(params, x, noise=None, layer_inputs=None) -> (logits, pre-activations, layer inputs).
    Returns (grads, per-example clean loss, clean logits). Pass `normalizer` = global batch size
    so that summing the result over devices gives the global-batch estimate.

    The clean and noisy passes are one forward over [x; x] with noise on the second half only:
    both halves go through the same kernels, so their float32 rounding largely cancels in
    delta_i, which is what keeps sigma=1e-5 usable and the update independent of the mesh.
    """
    b = x.shape[0]
    _, shapes, _ = jax.eval_shape(lambda: apply_fn(params, x[:1]))
    xi = draw_noise(keys, [s.shape[1:] for s in shapes], noise_kind)
    both_noise = [jnp.concatenate([jnp.zeros_like(n), sigma * n]) for n in xi]
    logits, _, inputs = apply_fn(params, jnp.concatenate([x, x]), noise=both_noise)
    example_loss = loss_fn(logits, jnp.concatenate([labels, labels]))
    clean_loss, clean_logits = example_loss[:b], logits[:b]
    delta = example_loss[b:] - clean_loss  # float32, one per example
    coef = delta / (sigma * normalizer)

    # Each layer's own weight-gradient op at its noisy input; the primal matmuls are dead code.
    noisy_inputs = [h[b:] for h in inputs]
    preacts, vjp_fn = jax.vjp(lambda p: apply_fn(p, x, layer_inputs=noisy_inputs)[1], params)
    cotangents = [(coef.reshape((-1,) + (1,) * (n.ndim - 1)) * n).astype(a.dtype)
                  for n, a in zip(xi, preacts)]
    (grads,) = vjp_fn(cotangents)
    return grads, clean_loss, clean_logits
