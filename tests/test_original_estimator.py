"""`--np_estimator=original`: the original code's estimator, a labelled, biased reference.

It must be exactly the original formula (one noise draw for the whole batch, the batch-mean
loss change), the same on 1 and 8 devices, and visibly biased: its exact expectation (all sign
patterns of the shared noise enumerated) is not the gradient, which the per-example
estimator's is (test_estimator_exact.py).
"""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_estimator_exact import (
    CLASSES,
    HIDDEN,
    SEED,
    SIGMA,
    STEP,
    TAPS,
    B,
    _assert_equal,
    _forward,
    _tiny,
)

from nodepert_dist import losses, optim, perturbation
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.config import Config
from nodepert_dist.estimator import NPSettings


def _shared_noise(seed, step, kind):
    """{tap: (nodes,)} from keys built by hand: key(seed) -> 2 -> step -> crc32 of the tap."""
    widths = {"tap0": HIDDEN, "tap1": CLASSES}
    noise = {}
    with jax.threefry_partitionable(False):
        for tap, n in widths.items():
            k = jax.random.fold_in(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step),
                zlib.crc32(tap.encode()) & 0x7FFFFFFF,
            )
            if kind == "rademacher":
                words = np.asarray(jax.random.bits(k, ((n + 31) // 32,), jnp.uint32))
                noise[tap] = (
                    2.0 * ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1)[:n]
                    - 1.0
                )
            else:
                noise[tap] = np.asarray(jax.random.normal(k, (n,), jnp.float32), np.float64)
    return noise


def original_formula(params, x, y, loss_fn, xi, sigma):
    """The original code's update (its optim.py at HEAD): the same xi for every example,
    d = mean_i [L_i(sigma xi) - L_i(0)], and dW_l = (d / sigma) (1/B) sum_i outer(h~_{l-1,i}, xi_l),
    db_l = (d / sigma) xi_l, with h~ the noisy pass's layer inputs."""
    noisy = {t: sigma * jnp.broadcast_to(xi[t], (len(x), len(xi[t]))) for t in TAPS}
    logits, pre = _forward(params, x, noisy, jax.nn.relu)
    d = jnp.mean(loss_fn(logits, y) - loss_fn(_forward(params, x, {}, jax.nn.relu)[0], y))
    inputs = {"tap0": x, "tap1": jax.nn.relu(pre["tap0"])}
    return {
        f"layer{l}": {
            "kernel": d / sigma * jnp.outer(jnp.mean(inputs[t], 0), xi[t]),
            "bias": d / sigma * jnp.asarray(xi[t]),
        }
        for l, t in enumerate(TAPS)
    }


def shared_noise_formula(params, x, y, loss_fn, xi, sigma):
    """The original code's 2021 update (its models/optim.py and fc.py of that year, behind the
    published figures): the same xi for every example (the key not vmapped), each example's
    own d_i = L_i(sigma xi) - L_i(0), and dW_l = (1/B) sum_i (d_i / sigma) outer(h~_{l-1,i},
    xi_l), db_l = (1/B) sum_i (d_i / sigma) xi_l."""
    noisy = {t: sigma * jnp.broadcast_to(xi[t], (len(x), len(xi[t]))) for t in TAPS}
    logits, pre = _forward(params, x, noisy, jax.nn.relu)
    d = loss_fn(logits, y) - loss_fn(_forward(params, x, {}, jax.nn.relu)[0], y)
    inputs = {"tap0": x, "tap1": jax.nn.relu(pre["tap0"])}
    return {
        f"layer{l}": {
            "kernel": jnp.outer(jnp.mean(d[:, None] * inputs[t], 0), xi[t]) / sigma,
            "bias": jnp.mean(d) / sigma * jnp.asarray(xi[t]),
        }
        for l, t in enumerate(TAPS)
    }


FORMULAS = {"original": original_formula, "shared_noise": shared_noise_formula}


@pytest.mark.parametrize(
    "estimator, noise",
    [("original", kind) for kind in perturbation.NOISE_KINDS] + [("shared_noise", "gaussian")],
)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_original_estimator_is_the_original_formula_on_1_and_8_devices(estimator, noise):
    """Through the train step (lr 1: params0 - params1 is the update), float64. On 8 devices the
    batch is given twice (8 examples, one per device): the batch means, hence the update, are
    those of the 4 examples, which holds only if the noise is one draw for the whole global
    batch and (original) the loss change is averaged over it, not per device."""
    with jax.enable_x64(True):
        model, params, x, y = _tiny()
        params0 = jax.device_get(params)
        expected = FORMULAS[estimator](
            params0, x, y, losses.mse, _shared_noise(SEED, STEP, noise), SIGMA
        )
        opt = optim.make_optimizer("sgd", 1.0, 0.0)
        for devices, (xs, ys) in (
            (1, (x, y)),
            (8, (jnp.concatenate([x, x]), jnp.concatenate([y, y]))),
        ):
            mesh = mesh_lib.make_mesh(jax.devices()[:devices])
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            state = jax.device_put(
                step_lib.TrainState(
                    step=jnp.int32(STEP), params=params0, opt_state=opt.init(params0)
                ),
                rep,
            )
            step = step_lib.make_train_step(
                model,
                opt,
                mesh,
                update_rule="np",
                loss="mse",
                seed=SEED,
                global_batch=len(xs),
                np=NPSettings(sigma=SIGMA, noise=noise, np_estimator=estimator),
            )
            new, metrics = step(state, *mesh_lib.global_batch(mesh, np.asarray(xs), np.asarray(ys)))
            update = jax.tree.map(lambda a, b: a - b, params0, jax.device_get(new.params))
            _assert_equal(update, expected, rtol=1e-9)
            clean = losses.mse(_forward(params0, xs, {}, jax.nn.relu)[0], ys)
            np.testing.assert_allclose(metrics["loss_sum"], jnp.sum(clean), rtol=1e-12)


def _exact_expectation(formula, sigma=1e-6):
    """(params, x, y, the formula's mean over all 2^5 sign patterns of the shared noise, the
    mse gradient) on the tiny net, in the caller's float64."""
    model, params, x, y = _tiny()
    patterns = [
        {"tap0": np.asarray(p[:HIDDEN]), "tap1": np.asarray(p[HIDDEN:])}
        for p in itertools.product([-1.0, 1.0], repeat=HIDDEN + CLASSES)
    ]
    mean = jax.tree.map(
        lambda *g: sum(g) / len(g), *[formula(params, x, y, losses.mse, p, sigma) for p in patterns]
    )
    true = jax.grad(lambda p: jnp.mean(losses.mse(model.apply({"params": p}, x), y)))(params)
    return params, x, y, mean, true


def test_original_estimator_is_biased_and_per_example_is_not():
    """Exact expectations over all 2^5 sign patterns of the shared noise, sigma 1e-6 (float64):
    the original estimator's is, to first order in sigma, (mean_i h_i) outer (mean_i dL_i/da_i)
    per layer, far from the gradient (the batch mean of the outer products), while the
    per-example estimator's exact expectation is the gradient (test_estimator_exact.py)."""
    with jax.enable_x64(True):
        params, x, y, mean, true = _exact_expectation(original_formula)
        # the first-order prediction: per-example slopes dL_i/da at the taps, batch means
        slopes = jax.grad(lambda e: jnp.sum(losses.mse(_forward(params, x, e, jax.nn.relu)[0], y)))(
            {t: jnp.zeros((B, n)) for t, n in zip(TAPS, (HIDDEN, CLASSES))}
        )
        inputs = {"tap0": x, "tap1": jax.nn.relu(_forward(params, x, {}, jax.nn.relu)[1]["tap0"])}
        predicted = {
            f"layer{l}": {
                "kernel": jnp.outer(inputs[t].mean(0), slopes[t].mean(0)),
                "bias": slopes[t].mean(0),
            }
            for l, t in enumerate(TAPS)
        }
        _assert_equal(mean, predicted, rtol=1e-4)
        error = [
            float(jnp.linalg.norm(m - g) / jnp.linalg.norm(g))
            for m, g in zip(jax.tree.leaves(mean), jax.tree.leaves(true))
        ]
        # A bias's update has no input factor: (mean_i dL_i/da) is its gradient, unbiased. A
        # kernel's is the product of batch means: every kernel is off by a large fraction.
        _assert_equal(
            {l: v["bias"] for l, v in mean.items()},
            {l: v["bias"] for l, v in true.items()},
            rtol=1e-4,
        )
        kernels = [
            e
            for (path, _), e in zip(jax.tree_util.tree_leaves_with_path(mean), error)
            if "kernel" in jax.tree_util.keystr(path)
        ]
        assert min(kernels) > 0.2, error


def test_shared_noise_estimator_is_unbiased():
    """The 2021 estimator's exact expectation over all 2^5 sign patterns of the shared noise
    (sigma 1e-6, float64) is the gradient: sharing the draw across the batch costs variance,
    not bias, because each example keeps its own loss change. (The HEAD estimator's is not:
    the test above.)"""
    with jax.enable_x64(True):
        _, _, _, mean, true = _exact_expectation(shared_noise_formula)
        _assert_equal(mean, true, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["original", "shared_noise"])
@pytest.mark.parametrize(
    "flags, bad",
    [
        (dict(np_layerwise=True), "--np_layerwise"),
        (dict(np_draws=2), "--np_draws=2"),
        (dict(np_antithetic=True), "--np_antithetic"),
        (dict(np_delta="jvp"), "--np_delta=jvp"),
        (dict(np_microbatches=2), "--np_microbatches=2"),
        (dict(np_mode="regen"), "--np_mode=regen"),
    ],
)
def test_original_estimator_refuses_the_per_example_options(estimator, flags, bad):
    with pytest.raises(
        ValueError,
        match=f"--np_estimator={estimator} is the original code's "
        f"estimator as it was, a reference; drop {bad}$",
    ):
        Config(np_estimator=estimator, **flags).validate()


def test_original_draws_its_noise_after_the_clean_pass(monkeypatch):
    """Like the per-example estimator, the original one draws its noise only once its clean
    pass is done (its key plus a zero of the clean loss): XLA then frees the clean pass before
    the noise is alive. With the key as it is (no such zero), the peak temp memory is higher."""
    from nodepert_dist import models

    model = models.build_model("conv", 10)
    x, y = jnp.ones((16, 28, 28, 1)), jnp.zeros((16,), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def temp_bytes():
        grad = lambda p: perturbation.original_gradient(
            model, p, x, y, losses.mse, sigma=SIGMA, key=perturbation.step_key(0, 0), normalizer=16
        )
        return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes

    ordered = temp_bytes()
    monkeypatch.setattr(perturbation, "_keys_after", lambda keys, after: keys)
    assert ordered < temp_bytes()
