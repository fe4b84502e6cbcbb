"""--precision: it reaches every matmul and conv of the NP and SGD steps; the TF32 emulation
rounds what a GPU's TF32 rounds; the sigma floor refuses, on a GPU only, what TF32 would bias."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from test_estimator import CASES, _assert_unbiased, _mean_estimate, _np_estimate, _setup

from nodepert_dist import config, models, optim, precision
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings

BATCH = 16


def _ops(jaxpr, found):
    """(primitive name, precision) of every dot_general and conv in `jaxpr` and its bodies."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append((eqn.primitive.name, eqn.params["precision"]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _ops(sub.jaxpr, found)
                elif isinstance(sub, jcore.Jaxpr):
                    _ops(sub, found)
    return found


@pytest.mark.parametrize("update_rule", ["np", "sgd"])
@pytest.mark.parametrize("network", ["fc", "conv"])
def test_precision_reaches_every_matmul_and_conv_of_the_step(network, update_rule):
    """Forward, SGD's backward, NP's replay VJP and --decorrelate's einsums: all at `high`
    (neither jax's nor the model's default), in the jaxpr and in the lowered StableHLO."""
    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    model = models.build_model(network, 10, n_hl=1, hl_size=8, precision="high", decorrelate=True)
    opt = optim.make_optimizer("sgd", 0.1, 0.0)
    x = np.random.default_rng(0).normal(size=(BATCH, 8, 8, 1)).astype(np.float32)
    y = np.arange(BATCH, dtype=np.int32) % 10
    state = step_lib.init_state(model, opt, x, 0, mesh)
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule=update_rule,
        loss="mse",
        seed=0,
        global_batch=BATCH,
        np=NPSettings(sigma=1e-3),
        decorrelate_lr=1e-3,
    )
    batch = mesh_lib.global_batch(mesh, x, y)
    found = _ops(jax.make_jaxpr(step)(state, *batch).jaxpr, [])
    kinds = {name for name, _ in found}
    assert kinds == (
        {"dot_general", "conv_general_dilated"} if network == "conv" else {"dot_general"}
    )
    high = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)
    assert all(p == high for _, p in found), found
    hlo = step.lower(state, *batch).as_text()
    ops = [line for line in hlo.splitlines() if "dot_general" in line or "convolution(" in line]
    assert ops and all("HIGH" in line and "HIGHEST" not in line for line in ops), ops


def test_precision_is_a_recorded_setting_a_resume_may_change():
    cfg = config.Config(precision="default", workdir="x")
    assert dataclasses.asdict(cfg.resolved())["precision"] == "default"  # config.json's content
    assert config.RESUME_RULE["precision"] == "warn"
    assert cfg.model.precision == "default"
    assert models.build(cfg.model, 10).precision == "default"


# ----------------------------------------------------------------------------- emulation


def test_emulation_rounds_operands_of_every_dot_and_conv_to_tf32():
    """1 + 2^-12 is 1 in TF32 (10 mantissa bits): the product loses it, float32 keeps it;
    inside jit, scan bodies, custom_jvp (relu) and autodiff's transposed dots too."""
    a = jnp.full((4, 4), 1 + 2.0**-12, jnp.float32)
    b = jnp.ones((4, 4), jnp.float32)
    conv = lambda u, v: jax.lax.conv_general_dilated(u[None, None], v[None, None], (1, 1), "SAME")
    loop = lambda u: jax.lax.fori_loop(0, 2, lambda i, c: jax.nn.relu(c @ b) / 4, u)
    grad = jax.grad(lambda u: jnp.sum((u @ b) ** 2))
    for fn, args in [
        (jnp.matmul, (a, b)),
        (jax.jit(jnp.matmul), (a, b)),
        (conv, (a, b)),
        (loop, (a,)),
        (grad, (a,)),
    ]:
        exact, emulated = fn(*args), precision.emulate_tf32(fn)(*args)
        rounded = fn(*(precision.tf32(u) for u in args))
        assert not np.array_equal(exact, emulated)
        np.testing.assert_array_equal(emulated, rounded)

    # Every other op as traced, in its own context: the noise is the same bits.
    def draw(k):
        with jax.threefry_partitionable(False):  # as perturbation.py draws noise
            return jax.random.bits(jax.random.fold_in(k, 3), (64,))

    key = jax.random.key(0)
    np.testing.assert_array_equal(precision.emulate_tf32(draw)(key), draw(key))
    # Nearest, halfway cases to the even mantissa (lax.reduce_precision's rule).
    assert precision.tf32(jnp.float32(1 + 2.0**-11)) == 1
    assert precision.tf32(jnp.float32(1 + 3 * 2.0**-11)) == 1 + 2.0**-9


def _tf32_mean(name, sigma, draws=None, **options):
    """test_estimator's case `name`: the mean NP estimate with every matmul and conv in emulated
    TF32, and the float32 gradient; `options` go to np_gradient."""
    body, shape, act, loss, _, case_draws = CASES[name]
    model, params, x, y, loss_fn, true = _setup(body, shape, act, loss)
    estimate = precision.emulate_tf32(
        lambda step: _np_estimate(model, params, x, y, loss_fn, sigma, step, **options)
    )
    return jax.jit(lambda: _mean_estimate(estimate, params, draws or case_draws))(), true


# The largest floor of precision.TF32_SIGMA_FLOOR, as the bf16 test takes bf16's.
TF32_SIGMA = max(precision.TF32_SIGMA_FLOOR.values())


@pytest.mark.slow  # seconds of sampling
def test_np_is_unbiased_in_tf32_at_the_floor():
    """At the floor NP's mean in TF32 matches the float32 gradient (cosine >= 0.99, norm
    within 15%, every leaf) with test_estimator's float32 draws. Two hidden layers: the noise
    of the first passes through rounded matmuls. (conv passes too, cosine 0.993: 50 s.)"""
    _assert_unbiased(*_tf32_mean("fc-mse", TF32_SIGMA))


@pytest.mark.slow  # seconds of sampling
def test_tf32_below_the_floor_is_biased():
    """What the floor guards against: at fc's float32 default, 1e-4, TF32's rounding swamps the
    loss change (cosine 0.62 measured); the same harness passes in float32 there
    (test_estimator)."""
    with pytest.raises(AssertionError):
        _assert_unbiased(*_tf32_mean("fc-mse", 1e-4))


@pytest.mark.slow  # seconds of sampling
def test_jvp_delta_has_no_tf32_floor():
    """--np_delta=jvp differentiates instead of differencing: unbiased in TF32 at 1e-4, where
    the finite difference is not (above)."""
    _assert_unbiased(*_tf32_mean("fc-mse", 1e-4, delta="jvp"))


# ----------------------------------------------------------------------------- the floor check


FLOOR = precision.TF32_SIGMA_FLOOR["fc"]


def _validate(backend, monkeypatch, **settings):
    monkeypatch.setattr(precision, "backend", lambda: backend)
    config.Config(**{"workdir": "x", **settings}).validate()


def test_sigma_below_tf32_floor_is_one_line_on_a_gpu(monkeypatch):
    below = FLOOR / 10
    with pytest.raises(ValueError) as e:
        _validate("gpu", monkeypatch, sigma=below, precision="default")
    text = str(e.value)
    assert "\n" not in text and "--sigma" in text and "--precision=highest" in text
    with pytest.raises(ValueError):
        _validate("gpu", monkeypatch, sigma=below, precision="high")
    _validate("gpu", monkeypatch, sigma=below, precision="highest")  # float32: no floor
    _validate("gpu", monkeypatch, sigma=below, precision="default", np_delta="jvp")  # no floor
    _validate("gpu", monkeypatch, sigma=FLOOR, precision="default")
    _validate("gpu", monkeypatch, sigma=below, precision="default", update_rule="sgd")
    _validate("cpu", monkeypatch, sigma=below, precision="default")  # a CPU computes float32


def test_default_sigma_is_at_or_above_the_floor_of_its_precision(monkeypatch):
    for network in models.NETWORKS:
        for p in precision.PRECISIONS:
            cfg = config.Config(network=network, precision=p, workdir="x").resolved()
            assert cfg.sigma >= precision.sigma_floor(network, "float32", p) > 0 or (p == "highest")
            _validate("gpu", monkeypatch, network=network, precision=p, sigma=cfg.sigma)
    # The project default is float32 on every backend: the original sigmas stand.
    assert config.Config(workdir="x").resolved().sigma == 1e-4
    assert config.Config(network="conv", workdir="x").resolved().sigma == 1e-5


def test_measurements_and_zca_compute_in_float32_whatever_the_backend():
    """Outside the model, matmuls that are no part of the training compute: the probes' angles
    and ZCA whitening on the device stay float32 on a GPU (its default precision is TF32)."""
    from nodepert_dist.data import preprocess
    from nodepert_dist.experiments import probes

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    a = jnp.ones(8)
    assert _ops(jax.make_jaxpr(probes.angle_deg)(a, a).jaxpr, []) == [("dot_general", highest)]
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    x = np.random.default_rng(0).integers(0, 255, (16, 2, 2, 1), dtype=np.uint8)
    whiten = preprocess.device_fn("zca", preprocess.compute(x, "zca", 0, 16), mesh)
    batch = mesh_lib.global_batch(mesh, x)[0]
    ops = _ops(jax.make_jaxpr(whiten)(batch).jaxpr, [])
    assert ops and all(p == highest for _, p in ops), ops
