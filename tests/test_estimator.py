"""NP is unbiased: the mean of many NP estimates matches jax.grad, per layer type and per leaf.

The same harness run on the batch-mean estimator of DESIGN.md section 2 (one shared noise draw,
one batch-mean loss change) must fail, so these tests can tell a biased estimator apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, perturbation
from nodepert_dist.models import Layer

BATCH = 32


def _setup(layers, input_shape, activation="relu", loss="ce"):
    model = models.TappedNetwork(tuple(layers), activation=activation)
    x = jax.random.normal(jax.random.key(1), (BATCH,) + input_shape)
    y = jnp.arange(BATCH) % 10
    params = model.init(jax.random.key(0), x)["params"]

    def apply_fn(p, x, noise=None, layer_inputs=None):
        return model.apply({"params": p}, x, noise=noise, layer_inputs=layer_inputs)

    loss_fn = losses.get(loss)
    true = jax.grad(lambda p: jnp.mean(loss_fn(apply_fn(p, x)[0], y)))(params)
    return apply_fn, params, x, y, loss_fn, true


def _mean_estimate(estimate, like, draws):
    total = jax.lax.fori_loop(0, draws, lambda i, acc: jax.tree.map(jnp.add, acc, estimate(i)),
                              jax.tree.map(jnp.zeros_like, like))
    return jax.tree.map(lambda a: a / draws, total)


def _cosines(a, b):
    return {jax.tree_util.keystr(k): float(jnp.vdot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
            for (k, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))}


def _np_mean(apply_fn, params, x, y, loss_fn, sigma, draws, noise="gaussian"):
    @jax.jit
    def estimate(step):
        keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
        return perturbation.np_gradient(apply_fn, params, x, y, loss_fn, sigma=sigma, keys=keys,
                                        normalizer=BATCH, noise_kind=noise)[0]
    return jax.jit(lambda: _mean_estimate(estimate, params, draws))()


CASES = {
    # name: (layers, input shape, activation, loss, sigma, draws)
    "dense": ([Layer("dense", 10)], (12,), "relu", "ce", 1e-4, 3000),
    "conv": ([Layer("conv", 3, 3, 2), Layer("dense", 10)], (6, 6, 2), "relu", "ce", 1e-4, 6000),
    "fc-mse": ([Layer("dense", 16), Layer("dense", 16), Layer("dense", 10)], (12,), "relu", "mse", 1e-4, 8000),
    "linfc": ([Layer("dense", 16), Layer("dense", 10)], (12,), "linear", "ce", 1e-4, 8000),
    "conv-net-sigma1e-5": ([Layer("conv", 3, 3, 1), Layer("conv", 3, 3, 2), Layer("dense", 10)],
                           (6, 6, 1), "relu", "mse", 1e-5, 32000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_np_is_unbiased_per_layer(name):
    layers, shape, act, loss, sigma, draws = CASES[name]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)
    cos = _cosines(_np_mean(apply_fn, params, x, y, loss_fn, sigma, draws), true)
    assert min(cos.values()) >= 0.99, cos


def test_np_is_unbiased_with_rademacher_noise():
    layers, shape, act, loss, sigma, draws = CASES["fc-mse"]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)
    cos = _cosines(_np_mean(apply_fn, params, x, y, loss_fn, sigma, draws, "rademacher"), true)
    assert min(cos.values()) >= 0.99, cos


def test_rademacher_noise_is_signs_with_unit_variance():
    keys = perturbation.example_keys(0, 0, jnp.arange(64))
    (n,) = perturbation.draw_noise(keys, [(7, 5)], "rademacher")
    assert n.shape == (64, 7, 5)
    assert set(np.unique(np.asarray(n)).tolist()) == {-1.0, 1.0}
    assert abs(float(n.mean())) < 0.05 and abs(float((n ** 2).mean()) - 1.0) < 1e-6


def test_same_harness_rejects_the_batch_mean_estimator():
    """The pitfall: one noise draw shared by the batch and the batch-mean loss change."""
    layers, shape, act, loss, sigma, draws = CASES["fc-mse"]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)

    @jax.jit
    def biased(step):
        key = perturbation.example_keys(0, step, jnp.zeros((1,), jnp.int32))
        shapes = [a.shape[1:] for a in apply_fn(params, x)[1]]
        shared = [jnp.broadcast_to(n, (BATCH,) + n.shape[1:])
                  for n in perturbation.draw_noise(key, shapes)]
        clean = loss_fn(apply_fn(params, x)[0], y)
        noisy_logits, _, noisy_inputs = apply_fn(params, x, noise=[sigma * n for n in shared])
        mean_delta = jnp.mean(loss_fn(noisy_logits, y) - clean)
        _, vjp = jax.vjp(lambda p: apply_fn(p, x, layer_inputs=noisy_inputs)[1], params)
        return vjp([mean_delta / (sigma * BATCH) * n for n in shared])[0]

    mean = jax.jit(lambda: _mean_estimate(biased, params, draws))()
    cos = _cosines(mean, true)
    assert min(cos.values()) < 0.9, cos
