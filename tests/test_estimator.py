"""NP is unbiased: the mean of many NP estimates matches jax.grad, per layer type and per leaf.

The same harness run on the batch-mean estimator of DESIGN.md section 2 (one shared noise draw,
one batch-mean loss change) must fail, so these tests can tell a biased estimator apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, mesh as mesh_lib, models, perturbation, step as step_lib
from nodepert_dist.models import Layer

BATCH = 32


def _setup(layers, input_shape, activation="relu", loss="ce", dtype=jnp.float32):
    model = models.TappedNetwork(tuple(layers), activation=activation, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (BATCH,) + input_shape, dtype)
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


def _norm_ratios(a, b):
    return {jax.tree_util.keystr(k): float(jnp.linalg.norm(u) / jnp.linalg.norm(v))
            for (k, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))}


def _assert_unbiased(mean, true):
    """Direction (cosine >= 0.99) and scale (norm within 15%) of the mean estimate, per leaf."""
    cos, ratio = _cosines(mean, true), _norm_ratios(mean, true)
    assert min(cos.values()) >= 0.99, cos
    assert all(0.85 <= r <= 1.15 for r in ratio.values()), ratio


def _np_estimate(apply_fn, params, x, y, loss_fn, sigma, step, **options):
    keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
    return perturbation.np_gradient(apply_fn, params, x, y, loss_fn, sigma=sigma, keys=keys,
                                    normalizer=BATCH, **options)[0]


def _np_mean(apply_fn, params, x, y, loss_fn, sigma, draws, **options):
    estimate = jax.jit(lambda step: _np_estimate(apply_fn, params, x, y, loss_fn, sigma, step,
                                                 **options))
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
    """Default options (Rademacher noise, keep mode)."""
    layers, shape, act, loss, sigma, draws = CASES[name]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)
    _assert_unbiased(_np_mean(apply_fn, params, x, y, loss_fn, sigma, draws), true)


OPTIONS = {
    "gaussian": dict(noise_kind="gaussian"),
    "gaussian-regen": dict(noise_kind="gaussian", mode="regen"),
    "rademacher-regen": dict(noise_kind="rademacher", mode="regen"),
    "rademacher-4-microbatches": dict(noise_kind="rademacher", microbatches=4),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["fc-mse", "conv"])
def test_np_is_unbiased_with_each_estimator_option(name, option):
    layers, shape, act, loss, sigma, draws = CASES[name]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)
    _assert_unbiased(_np_mean(apply_fn, params, x, y, loss_fn, sigma, draws, **OPTIONS[option]),
                     true)


def test_scale_check_rejects_a_doubled_estimate():
    """The norm check catches what the cosine cannot: a correctly aimed, wrongly scaled update."""
    layers, shape, act, loss, sigma, draws = CASES["dense"]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)
    mean = _np_mean(apply_fn, params, x, y, loss_fn, sigma, draws)
    with pytest.raises(AssertionError):
        _assert_unbiased(jax.tree.map(lambda g: 2 * g, mean), true)


@pytest.mark.parametrize("option", ["regen", "microbatches"])
def test_modes_give_the_same_update(option):
    """regen redraws the same noise; microbatches run the same examples with the same keys and
    return every example's loss and logits in place. float64: layouts agree to ~1e-12."""
    layers, shape, act, loss, sigma, _ = CASES["conv-net-sigma1e-5"]
    options = {"regen": dict(mode="regen"), "microbatches": dict(microbatches=4)}[option]
    with jax.enable_x64(True):
        apply_fn, params, x, y, loss_fn, _ = _setup(layers, shape, act, loss, jnp.float64)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        assert x.dtype == jnp.float64 and jax.tree.leaves(params)[0].dtype == jnp.float64
        keys = perturbation.example_keys(0, 3, jnp.arange(BATCH))
        for noise in perturbation.NOISE_KINDS:
            run = lambda **o: perturbation.np_gradient(apply_fn, params, x, y, loss_fn, sigma=1e-3,
                                                       keys=keys, normalizer=BATCH,
                                                       noise_kind=noise, **o)
            for u, v in zip(jax.tree.leaves(run()), jax.tree.leaves(run(**options))):
                np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12)


def test_regen_draws_the_noise_again():
    """regen must redraw (that is what frees the noise), not reuse the first draw."""
    layers, shape, act, loss, _, _ = CASES["fc-mse"]
    apply_fn, params, x, y, loss_fn, _ = _setup(layers, shape, act, loss)
    keys = perturbation.example_keys(0, 0, jnp.arange(BATCH))
    draws = lambda mode: str(jax.make_jaxpr(lambda p: perturbation.np_gradient(
        apply_fn, p, x, y, loss_fn, sigma=1e-4, keys=keys, normalizer=BATCH, mode=mode))(
        params)).count("random_bits")
    assert draws("regen") == 2 * draws("keep") > 0


def test_noise_differs_between_steps_examples_and_layers():
    """A constant step or example index in the keys would reuse noise (and pass the MC tests)."""
    draw = lambda step, idx: perturbation.draw_noise(
        perturbation.example_keys(0, step, jnp.asarray(idx)), [(64,), (64,)], "gaussian")
    (a0, a1), (b0, _) = draw(0, [0, 1]), draw(1, [0, 1])
    assert not np.allclose(a0[0], a0[1])   # examples 0 and 1, same step
    assert not np.allclose(a0[0], b0[0])   # steps 0 and 1, same example
    assert not np.allclose(a0[0], a1[0])   # layers 0 and 1
    c0 = draw(0, [1])[0]
    np.testing.assert_array_equal(c0[0], a0[1])  # an example's noise depends on its index only


def test_init_and_noise_streams_are_apart():
    keys = [perturbation.stream_key(0, "init"), perturbation.stream_key(0, "noise"), jax.random.key(0)]
    data = [tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys]
    assert len(set(data)) == 3, data
    # and init_state draws the parameters from the init stream
    model = models.build_model("fc", 10, n_hl=1, hl_size=8)
    x = np.zeros((8, 12), np.float32)
    state = step_lib.init_state(model, step_lib.make_optimizer("sgd", 0.1, 0.0), x, 0,
                                mesh_lib.make_mesh(jax.devices()[:1]))
    expected = model.init(perturbation.stream_key(0, "init"), x[:1])["params"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_rademacher_noise_is_signs_with_unit_variance():
    keys = perturbation.example_keys(0, 0, jnp.arange(64))
    (n,) = perturbation.draw_noise(keys, [(7, 5)], "rademacher")
    assert n.shape == (64, 7, 5)
    assert set(np.unique(np.asarray(n)).tolist()) == {-1.0, 1.0}
    assert abs(float(n.mean())) < 0.05 and abs(float((n ** 2).mean()) - 1.0) < 1e-6
    # Neighbouring nodes take different bits: not all equal along any axis.
    assert float(jnp.abs(jnp.diff(n, axis=-1)).mean()) > 0.5


def test_same_harness_rejects_the_batch_mean_estimator():
    """The pitfall: one noise draw shared by the batch and the batch-mean loss change."""
    layers, shape, act, loss, sigma, draws = CASES["fc-mse"]
    apply_fn, params, x, y, loss_fn, true = _setup(layers, shape, act, loss)

    @jax.jit
    def biased(step):
        key = perturbation.example_keys(0, step, jnp.zeros((1,), jnp.int32))
        shapes = [a.shape[1:] for a in apply_fn(params, x)[1]]
        shared = [jnp.broadcast_to(n, (BATCH,) + n.shape[1:])
                  for n in perturbation.draw_noise(key, shapes, "gaussian")]
        clean = loss_fn(apply_fn(params, x)[0], y)
        noisy_logits, _, noisy_inputs = apply_fn(params, x, noise=[sigma * n for n in shared])
        mean_delta = jnp.mean(loss_fn(noisy_logits, y) - clean)
        _, vjp = jax.vjp(lambda p: apply_fn(p, x, layer_inputs=noisy_inputs)[1], params)
        return vjp([mean_delta / (sigma * BATCH) * n for n in shared])[0]

    mean = jax.jit(lambda: _mean_estimate(biased, params, draws))()
    cos = _cosines(mean, true)
    assert min(cos.values()) < 0.9, cos
