"""The variance-reduction options of the NP estimator (perturbation.py): each unbiased, each
doing what it claims (antithetic: less finite-sigma bias; K draws: variance / K; jvp: the
sigma -> 0 limit of the finite difference; layerwise: less variance), and one-line errors.

The Monte-Carlo harness is tests/test_estimator.py's; 1 vs 8 devices is in tests/test_step.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_estimator import BATCH, CASES, _assert_unbiased, _np_mean, _setup

from nodepert_dist import perturbation

OPTIONS = {
    "antithetic": dict(antithetic=True),
    "jvp": dict(delta="jvp"),
    "layerwise": dict(layerwise=True),
    # K draws per sample: a quarter of the samples gives the same number of noise draws.
    "4-draws": dict(draws=4),
    "layerwise-jvp-2-draws-regen": dict(layerwise=True, delta="jvp", draws=2, mode="regen"),
}


@pytest.mark.parametrize(
    "name, option", [("fc-mse", o) for o in OPTIONS] + [("conv", "layerwise-jvp-2-draws-regen")]
)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_each_option_is_unbiased(name, option):
    body, shape, act, loss, sigma, samples = CASES[name]
    options = OPTIONS[option]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    samples //= options.get("draws", 1)
    _assert_unbiased(_np_mean(model, params, x, y, loss_fn, sigma, samples, **options), true)


def _moments(name, samples, sigma=None, **options):
    """(mean estimate, total variance of one estimate) over `samples` steps' noise."""
    body, shape, act, loss, default_sigma, _ = CASES[name]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    sigma = sigma or default_sigma

    @jax.jit
    def estimate(step):
        keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
        return perturbation.np_gradient(
            model, params, x, y, loss_fn, sigma=sigma, keys=keys, normalizer=BATCH, **options
        )[0]

    @jax.jit
    def run():
        def add(i, acc):
            g = estimate(i)
            return jax.tree.map(jnp.add, acc[0], g), jax.tree.map(lambda a, v: a + v * v, acc[1], g)

        zero = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, samples, add, (zero, zero))

    total, squares = run()
    mean = jax.tree.map(lambda t: t / samples, total)
    var = {
        jax.tree_util.keystr(k): float(jnp.sum(s / samples - m * m))
        for (k, s), m in zip(jax.tree_util.tree_leaves_with_path(squares), jax.tree.leaves(mean))
    }
    return mean, var, true


def _flat(tree):
    return jnp.concatenate([v.ravel() for v in jax.tree.leaves(tree)])


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_antithetic_has_less_bias_than_one_sided_at_a_large_sigma():
    """mse on sigmoid outputs after two ReLU layers (curvature everywhere), sigma 1.0. The bias
    is measured against the jvp estimator with the same noise (common random numbers: the
    leading term g.xi of every estimator is the same, so its Monte-Carlo noise cancels).
    Measured: one-sided 0.45, antithetic 0.31 (sigma 0.3: 0.118 vs 0.102). With symmetric
    noise E[(xi^T H xi) xi] = 0, so most of the gain is the replay at the pair's mean (0.45
    with the + pass's values), not the cancelled curvature term (perturbation.py)."""
    exact, _, _ = _moments("fc-mse", 2000, delta="jvp")
    one, _, _ = _moments("fc-mse", 2000, sigma=1.0)
    anti, _, _ = _moments("fc-mse", 2000, sigma=1.0, antithetic=True)
    bias = {
        k: float(jnp.linalg.norm(_flat(m) - _flat(exact)) / jnp.linalg.norm(_flat(exact)))
        for k, m in (("one-sided", one), ("antithetic", anti))
    }
    assert bias["antithetic"] < 0.8 * bias["one-sided"], bias


def test_k_draws_divide_the_variance_by_k():
    _, var1, _ = _moments("fc-mse", 800)
    _, var4, _ = _moments("fc-mse", 800, draws=4)
    ratio = sum(var1.values()) / sum(var4.values())
    assert 3.0 < ratio < 5.3, ratio


def test_layerwise_lowers_the_first_layers_variance():
    """Layer 0's estimate no longer carries the noise of the other 26 of the 42 nodes."""
    _, full, _ = _moments("fc-mse", 800)
    _, own, _ = _moments("fc-mse", 800, layerwise=True)
    first = [k for k in full if "Dense_0" in k or "layer0" in k]
    assert first and all(own[k] < 0.7 * full[k] for k in first), (full, own)


def _float64_estimate(sigma, step=3, **options):
    body, shape, act, loss, _, _ = CASES["fc-mse"]
    model, params, x, y, loss_fn, _ = _setup(body, shape, act, loss, jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    keys = options.pop("keys", perturbation.example_keys(0, step, jnp.arange(BATCH)))
    perturbation.check_options(
        options.get("mode", "keep"),
        options.get("antithetic", False),
        options.get("draws", 1),
        options.get("delta", "finite"),
    )
    return jax.jit(
        lambda: perturbation.np_gradient(
            model, params, x, y, loss_fn, sigma=sigma, keys=keys, normalizer=BATCH, **options
        )
    )()


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_jvp_delta_is_the_small_sigma_limit_of_the_finite_difference():
    """float64, same noise: the finite difference approaches the jvp update as O(sigma) (one-
    sided) and O(sigma^2) (antithetic); the per-example losses are the clean ones. (At sigma
    1e-4 the ReLU kinks a perturbation crosses already cost the pair 3e-3.)"""
    with jax.enable_x64(True):
        exact, loss, _ = _float64_estimate(1.0, delta="jvp")
        clean, clean_loss, _ = _float64_estimate(1e-6)
        pair, _, _ = _float64_estimate(1e-6, antithetic=True)
        np.testing.assert_allclose(loss, clean_loss, rtol=1e-12)
        for name, approx, rtol in (("one-sided", clean, 1e-5), ("antithetic", pair, 1e-8)):
            err = float(
                jnp.linalg.norm(_flat(approx) - _flat(exact)) / jnp.linalg.norm(_flat(exact))
            )
            assert err < rtol, (name, err)
        far, _, _ = _float64_estimate(1e-2)  # and it is a limit: a large sigma is further away
        assert float(jnp.linalg.norm(_flat(far) - _flat(exact))) > 10 * float(
            jnp.linalg.norm(_flat(clean) - _flat(exact))
        )


def test_draw_0_is_todays_noise_and_draws_average():
    """K=2 is the mean of the K=1 estimates with the example keys and with draw 1's keys."""
    with jax.enable_x64(True):
        keys = perturbation.example_keys(0, 3, jnp.arange(BATCH))
        two, _, _ = _float64_estimate(1e-3, draws=2)
        first, _, _ = _float64_estimate(1e-3, keys=keys)
        second, _, _ = _float64_estimate(1e-3, keys=perturbation.draw_keys(keys, 1))
        for u, a, b in zip(jax.tree.leaves(two), jax.tree.leaves(first), jax.tree.leaves(second)):
            np.testing.assert_allclose(u, (a + b) / 2, rtol=1e-9, atol=1e-14)
        assert not np.allclose(_flat(first), _flat(second))
        # and the averaging is exact: twice one draw's update is not the 2-draw update
        assert not np.allclose(_flat(two), _flat(first), rtol=1e-3)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(antithetic=True, delta="jvp"), "does nothing with --np_delta=jvp"),
        (dict(draws=0), "--np_draws=0 must be a positive integer"),
        (dict(delta="central"), "unknown --np_delta='central'"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with jax.enable_x64(True), pytest.raises(ValueError, match=message):
        _float64_estimate(1e-3, **options)
