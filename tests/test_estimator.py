"""NP is unbiased: the mean of many NP estimates matches jax.grad, per layer type and per leaf.

Each case is a small flax model with taps (taps.py) around one layer type. The same harness run
on the batch-mean estimator of docs/design/estimator.md (one shared noise draw, one batch-mean loss
change) must fail, so these tests can tell a biased estimator apart.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, optim, perturbation, precision, taps
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.taps import Tap

BATCH = 32


class Net(nn.Module):
    """The layers named by `body`, each with its tap, then a dense readout with a tap."""

    body: str
    activation: str = "relu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = nn.relu if self.activation == "relu" else (lambda h: h)
        conv = functools.partial(nn.Conv, padding="SAME", dtype=self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        h = x
        if self.body == "dense":
            pass
        elif self.body == "mlp":
            h = h.reshape(h.shape[0], -1)
            for _ in range(2):
                h = act(Tap()(dense(16)(h)))
        elif self.body == "conv":
            h = act(Tap()(conv(3, (3, 3))(h)))
        elif self.body == "strided":
            h = act(Tap()(conv(3, (3, 3))(h)))
            h = act(Tap()(conv(3, (3, 3), strides=2)(h)))
        elif self.body in ("maxpool", "avgpool"):
            h = act(Tap()(conv(4, (3, 3))(h)))
            pool = nn.max_pool if self.body == "maxpool" else nn.avg_pool
            h = pool(h, (2, 2), strides=(2, 2), padding="SAME")
        elif self.body == "residual":
            h = act(models.ConvUnit(3, dtype=self.dtype)(h))
            h = models.BasicBlock(3, dtype=self.dtype)(h)  # identity shortcut
            h = models.BasicBlock(4, 2, dtype=self.dtype)(h)  # tapped projection shortcut
            h = jnp.mean(h, axis=(1, 2))
        elif self.body == "groupnorm":
            h = act(models.ConvUnit(4, norm="group", dtype=self.dtype)(h))
        elif self.body == "layernorm":
            h = h.reshape(h.shape[0], -1)
            h = act(Tap()(nn.LayerNorm(dtype=self.dtype)(dense(16)(h))))
        else:
            raise ValueError(self.body)
        return Tap(name="readout_tap")(dense(10)(h.reshape(h.shape[0], -1)))


def _setup(body, input_shape, activation="relu", loss="ce", dtype=jnp.float32):
    model = Net(body, activation, dtype)
    x = jax.random.normal(jax.random.key(1), (BATCH,) + input_shape, dtype)
    y = jnp.arange(BATCH) % 10
    # init and the true gradient jitted: eager dispatch of the residual net's ops took ~10 s.
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    if body == "residual":  # unit2 starts at zero (skip-init): move it so its input gets a signal
        params = jax.jit(
            lambda ps: jax.tree.map(
                lambda p: p + 0.2 * jax.random.normal(jax.random.key(2), p.shape), ps
            )
        )(params)
    loss_fn = losses.get(loss)
    # The true gradient: of the float32 model, whatever dtype the estimate runs in.
    model32 = model.clone(dtype=jnp.float32)
    true = jax.jit(
        jax.grad(
            lambda p: jnp.mean(loss_fn(model32.apply({"params": p}, x.astype(jnp.float32)), y))
        )
    )(params)
    return model, params, x, y, loss_fn, true


def _mean_estimate(estimate, like, draws):
    total = jax.lax.fori_loop(
        0,
        draws,
        lambda i, acc: jax.tree.map(jnp.add, acc, estimate(i)),
        jax.tree.map(jnp.zeros_like, like),
    )
    return jax.tree.map(lambda a: a / draws, total)


def _cosines(a, b):
    return {
        jax.tree_util.keystr(k): float(jnp.vdot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
        for (k, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
    }


def _norm_ratios(a, b):
    return {
        jax.tree_util.keystr(k): float(jnp.linalg.norm(u) / jnp.linalg.norm(v))
        for (k, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
    }


def _assert_unbiased(mean, true):
    """Direction (cosine >= 0.99) and scale (norm within 15%) of the mean estimate, per leaf."""
    cos, ratio = _cosines(mean, true), _norm_ratios(mean, true)
    assert min(cos.values()) >= 0.99, cos
    assert all(0.85 <= r <= 1.15 for r in ratio.values()), ratio


def _np_estimate(model, params, x, y, loss_fn, sigma, step, **options):
    keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
    return perturbation.np_gradient(
        model, params, x, y, loss_fn, sigma=sigma, keys=keys, normalizer=BATCH, **options
    )[0]


def _np_mean(model, params, x, y, loss_fn, sigma, samples, **options):
    """The mean of `samples` estimates (steps 0..samples-1); `options` go to np_gradient."""
    estimate = jax.jit(
        lambda step: _np_estimate(model, params, x, y, loss_fn, sigma, step, **options)
    )
    return jax.jit(lambda: _mean_estimate(estimate, params, samples))()


CASES = {
    # name: (body, input shape, activation, loss, sigma, draws)
    "dense": ("dense", (12,), "relu", "ce", 1e-4, 3000),
    "conv": ("conv", (6, 6, 2), "relu", "ce", 1e-4, 20000),
    "fc-mse": ("mlp", (12,), "relu", "mse", 1e-4, 8000),
    "linfc": ("mlp", (12,), "linear", "ce", 1e-4, 8000),
    "strided-conv-sigma1e-5": ("strided", (6, 6, 1), "relu", "mse", 1e-5, 96000),
    "maxpool": ("maxpool", (6, 6, 2), "relu", "ce", 1e-4, 20000),
    "avgpool": ("avgpool", (4, 4, 2), "relu", "ce", 1e-4, 32000),
    "residual": ("residual", (4, 4, 2), "relu", "ce", 1e-4, 12000),
    "groupnorm": ("groupnorm", (6, 6, 2), "relu", "ce", 1e-4, 32000),
    "layernorm": ("layernorm", (12,), "relu", "ce", 1e-4, 8000),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_is_unbiased_per_layer(name):
    """Default options (Rademacher noise, keep mode)."""
    body, shape, act, loss, sigma, draws = CASES[name]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    _assert_unbiased(_np_mean(model, params, x, y, loss_fn, sigma, draws), true)


OPTIONS = {
    "gaussian": dict(noise_kind="gaussian"),
    "gaussian-regen": dict(noise_kind="gaussian", mode="regen"),
    "rademacher-regen": dict(noise_kind="rademacher", mode="regen"),
    "rademacher-4-microbatches": dict(noise_kind="rademacher", microbatches=4),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["fc-mse", "conv"])
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_is_unbiased_with_each_estimator_option(name, option):
    body, shape, act, loss, sigma, draws = CASES[name]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    _assert_unbiased(_np_mean(model, params, x, y, loss_fn, sigma, draws, **OPTIONS[option]), true)


BF16_SIGMA = max(precision.BF16_SIGMA_FLOOR.values())


@pytest.mark.parametrize("name", ["dense", "conv", "maxpool", "residual", "layernorm"])
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_is_unbiased_in_bfloat16_at_the_documented_sigma(name):
    """bf16 matmuls/convs, float32 parameters and loss differences, against the float32
    gradient, at the largest sigma floor of precision.BF16_SIGMA_FLOOR. Twice float32's draws:
    bf16 rounding adds variance (conv at 20000 draws: kernel cosine 0.988; at 40000: 0.994)."""
    body, shape, act, loss, _, draws = CASES[name]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss, jnp.bfloat16)
    assert x.dtype == jnp.bfloat16
    _assert_unbiased(_np_mean(model, params, x, y, loss_fn, BF16_SIGMA, 2 * draws), true)


def test_bfloat16_below_the_floor_is_biased():
    """What the floor guards against: at sigma 1e-3 bf16 rounds most of the noise away."""
    body, shape, act, loss, _, draws = CASES["dense"]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss, jnp.bfloat16)
    with pytest.raises(AssertionError):
        _assert_unbiased(_np_mean(model, params, x, y, loss_fn, 1e-3, draws), true)


def test_scale_check_rejects_a_doubled_estimate():
    """The norm check catches what the cosine cannot: a correctly aimed, wrongly scaled update."""
    body, shape, act, loss, sigma, draws = CASES["dense"]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    mean = _np_mean(model, params, x, y, loss_fn, sigma, draws)
    with pytest.raises(AssertionError):
        _assert_unbiased(jax.tree.map(lambda g: 2 * g, mean), true)


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_modes_give_the_same_update():
    """regen redraws the same noise; microbatches run the same examples with the same keys and
    return every example's loss and logits in place. float64: layouts agree to ~1e-12."""
    body, shape, act, loss, sigma, _ = CASES["residual"]
    with jax.enable_x64(True):
        model, params, x, y, loss_fn, _ = _setup(body, shape, act, loss, jnp.float64)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        assert x.dtype == jnp.float64 and jax.tree.leaves(params)[0].dtype == jnp.float64
        keys = perturbation.example_keys(0, 3, jnp.arange(BATCH))
        options = [{}, dict(mode="regen"), dict(microbatches=2)]
        for noise in perturbation.NOISE_KINDS:
            # The three layouts in one compiled function (eager dispatch of the residual net's
            # ops took minutes here; one compile each, most of the rest).
            grads = jax.jit(
                lambda p, noise=noise: [
                    perturbation.np_gradient(
                        model,
                        p,
                        x,
                        y,
                        loss_fn,
                        sigma=1e-3,
                        keys=keys,
                        normalizer=BATCH,
                        noise_kind=noise,
                        **o,
                    )
                    for o in options
                ]
            )(params)
            default = jax.tree.leaves(grads[0])
            for option, other in zip(options[1:], grads[1:]):
                for u, v in zip(default, jax.tree.leaves(other)):
                    np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12, err_msg=str(option))


def test_regen_draws_the_noise_again():
    """regen must redraw (that is what frees the noise), not reuse the first draw: keep hashes
    every tap's noise in one threefry call (noise.draw_noise), regen draws each tap's again
    (noise.draw_layer: jax.random.bits)."""
    body, shape, act, loss, _, _ = CASES["fc-mse"]
    model, params, x, y, loss_fn, _ = _setup(body, shape, act, loss)
    keys = perturbation.example_keys(0, 0, jnp.arange(BATCH))
    jaxpr = lambda mode: str(
        jax.make_jaxpr(
            lambda p: perturbation.np_gradient(
                model, p, x, y, loss_fn, sigma=1e-4, keys=keys, normalizer=BATCH, mode=mode
            )
        )(params)
    )
    draws = lambda mode: sum(jaxpr(mode).count(h) for h in ("threefry_rolled", "random_bits"))
    n_taps = len(taps.tap_shapes(model, params, x))
    assert draws("keep") == 1 and draws("regen") == 1 + n_taps and n_taps >= 2


def test_noise_differs_between_steps_examples_and_taps():
    """A constant step or example index in the keys would reuse noise (and pass the MC tests)."""
    draw = lambda step, idx: perturbation.draw_noise(
        perturbation.example_keys(0, step, jnp.asarray(idx)), {"a": (64,), "b": (64,)}, "gaussian"
    ).values()
    (a0, a1), (b0, _) = draw(0, [0, 1]), draw(1, [0, 1])
    assert not np.allclose(a0[0], a0[1])  # examples 0 and 1, same step
    assert not np.allclose(a0[0], b0[0])  # steps 0 and 1, same example
    assert not np.allclose(a0[0], a1[0])  # taps a and b
    c0 = list(draw(0, [1]))[0]
    np.testing.assert_array_equal(c0[0], a0[1])  # an example's noise depends on its index only


def test_init_and_noise_streams_are_apart():
    keys = [
        perturbation.stream_key(0, "init"),
        perturbation.stream_key(0, "noise"),
        jax.random.key(0),
    ]
    data = [tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys]
    assert len(set(data)) == 3, data
    # and init_state draws the parameters from the init stream
    model = models.build_model("fc", 10, n_hl=1, hl_size=8)
    x = np.zeros((8, 12), np.float32)
    state = step_lib.init_state(
        model, optim.make_optimizer("sgd", 0.1, 0.0), x, 0, mesh_lib.make_mesh(jax.devices()[:1])
    )
    expected = model.init(perturbation.stream_key(0, "init"), x[:1])["params"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_rademacher_noise_is_signs_with_unit_variance():
    keys = perturbation.example_keys(0, 0, jnp.arange(64))
    (n,) = perturbation.draw_noise(keys, {"t": (7, 5)}, "rademacher").values()
    assert n.shape == (64, 7, 5)
    assert set(np.unique(np.asarray(n)).tolist()) == {-1.0, 1.0}
    assert abs(float(n.mean())) < 0.05 and abs(float((n**2).mean()) - 1.0) < 1e-6
    # Neighbouring nodes take different bits: not all equal along any axis.
    assert float(jnp.abs(jnp.diff(n, axis=-1)).mean()) > 0.5


def test_same_harness_rejects_the_batch_mean_estimator():
    """The pitfall: one noise draw shared by the batch and the batch-mean loss change
    (`--np_estimator=original`)."""
    body, shape, act, loss, sigma, draws = CASES["fc-mse"]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)

    @jax.jit
    def biased(step):
        return perturbation.original_gradient(
            model,
            params,
            x,
            y,
            loss_fn,
            sigma=sigma,
            key=perturbation.step_key(0, step),
            normalizer=BATCH,
            noise_kind="gaussian",
        )[0]

    mean = jax.jit(lambda: _mean_estimate(biased, params, draws))()
    cos = _cosines(mean, true)
    assert min(cos.values()) < 0.9, cos
