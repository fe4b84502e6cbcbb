"""The probe library (experiments/probes.py): gradient statistics on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings
from nodepert_dist.experiments import probes


def tiny(seed=0, batch=32, hl=16):
    model = models.build_model("fc", 10, n_hl=2, hl_size=hl)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    return model, params, x, y


def true_grad(model, params, x, y):
    return jax.grad(lambda p: jnp.mean(losses.mse(model.apply({"params": p}, x), y)))(params)


def test_sgd_against_itself_gives_angle_0_and_sign_symmetry_1():
    model, params, x, y = tiny()
    g = true_grad(model, params, x, y)
    s = probes.compare(g, g)
    for name in ("layer0", "layer1", "layer2", "all"):
        assert float(s[f"{name}_angle"]) < 0.1  # arccos near 1 loses digits: ~0.03 deg in float32
        assert float(s[f"{name}_sign_sym"]) == 1.0
        assert float(s[f"{name}_ratio"]) == pytest.approx(1.0, abs=1e-6)
    # and a sign flip is the opposite answer: the statistics can fail
    flipped = probes.compare(g, jax.tree.map(jnp.negative, g))
    assert float(flipped["all_angle"]) > 179.9 and float(flipped["all_sign_sym"]) < 0.01  # exact zeros (dead units) agree


def test_np_mean_over_many_draws_approaches_angle_0():
    model, params, x, y = tiny()
    stats = {}
    for draws in (8, 512):
        gradient = step_lib.local_gradient(update_rule="np", loss="mse", seed=0,
                                           global_batch=len(y), np=NPSettings(sigma=1e-3))
        fn = probes.probe_fn(model, gradient, loss="mse", draws=draws, norms=True)
        stats[draws] = jax.device_get(fn(params, x, y))
    few, many = stats[8], stats[512]
    # One draw is far from the gradient (the NP variance), the mean of 512 is close: the MC
    # error falls as 1/sqrt(draws). Measured: var/|g|^2 ~10; one draw 74 deg, the mean of 8
    # draws 46 deg, of 512 draws 8 deg.
    assert few["all_angle"] > 45
    assert many["all_angle_mean"] < 15 < few["all_angle_mean"]
    for name in ("layer0", "layer1", "layer2"):
        assert many[f"{name}_angle_mean"] < 25
    # the variance over draws is an estimate of the same quantity at any number of draws
    assert many["all_rel_var"] == pytest.approx(few["all_rel_var"], rel=0.6)
    assert few["all_norm_sgd"] == pytest.approx(float(probes.flat(true_grad(
        model, params, x, y)).__pow__(2).sum() ** 0.5), rel=1e-5)
    assert few["layer0_w_norm"] > 0 and few["layer1_act_norm"] > 0
