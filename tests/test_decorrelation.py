"""--decorrelate: NP stays unbiased for W with R fixed, R's step is its rule on the global batch,
the same on 1 and 8 devices, and bad combinations are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_estimator import _assert_unbiased, _cosines, _mean_estimate

from nodepert_dist import decorrelation, losses, models, optim, perturbation
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.config import Config
from nodepert_dist.estimator import NPSettings

BATCH = 32

# name: (model, input shape, loss, draws)
CASES = {
    "fc": (
        lambda: models.build_model("fc", 10, n_hl=2, hl_size=16, decorrelate=True),
        (12,),
        "mse",
        8000,
    ),
    "conv": (lambda: models.ConvStack(((3, 3, 2),), 10, decorrelate=True), (6, 6, 2), "ce", 40000),
}


def _skewed(decor, key):
    """Matrices far from I, so that a gradient taken at R = I (R ignored) is far off too."""
    leaves, treedef = jax.tree.flatten(decor)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            r + 0.6 * jax.random.normal(k, r.shape) / np.sqrt(r.shape[0])
            for r, k in zip(leaves, keys)
        ]
    )


def _setup(name):
    build, shape, loss, draws = CASES[name]
    model = build()
    x = jax.random.normal(jax.random.key(1), (BATCH,) + shape)
    y = jnp.arange(BATCH) % 10
    variables = model.init(jax.random.key(0), x)
    params, decor = variables["params"], _skewed(variables[decorrelation.DECOR], jax.random.key(3))
    loss_fn = losses.get(loss)
    true_at = lambda d: jax.grad(
        lambda p: jnp.mean(loss_fn(model.apply({"params": p, decorrelation.DECOR: d}, x), y))
    )(params)
    return model, params, decor, x, y, loss_fn, true_at, draws


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_is_unbiased_for_the_weights_with_R_fixed(name):
    """The mean NP estimate through the bound model is jax.grad w.r.t. the params with R held
    fixed, and R itself gets no estimate (it is not a parameter)."""
    model, params, decor, x, y, loss_fn, true_at, draws = _setup(name)
    true, at_identity = true_at(decor), true_at(jax.tree.map(lambda r: jnp.eye(len(r)), decor))
    assert min(_cosines(true, at_identity).values()) < 0.95  # the harness can tell R apart
    bound = decorrelation.bind(model, decor)

    def estimate(step):
        keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
        return perturbation.np_gradient(
            bound, params, x, y, loss_fn, sigma=1e-4, keys=keys, normalizer=BATCH
        )[0]

    mean = jax.jit(lambda: _mean_estimate(jax.jit(estimate), params, draws))()
    assert jax.tree.structure(mean) == jax.tree.structure(params)
    _assert_unbiased(mean, true)


def _one_step(update_rule, n_devices, lr_d=0.05, network="fc", shape=(12,), **options):
    """fc with skewed matrices, one float64 step at lr 1 on 64 examples: (before, after)."""
    mesh = mesh_lib.make_mesh(jax.devices()[:n_devices])
    model = models.build_model(
        network,
        10,
        n_hl=1,
        hl_size=16,
        decorrelate=True,
        local_heads=options.get("np_local", False),
    ).clone(dtype=jnp.float64)
    opt = optim.make_optimizer("sgd", 1.0, 0.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64,) + shape), rng.integers(0, 10, 64).astype(np.int32)
    x[:, 1] += 0.8 * x[:, 0]  # correlated inputs
    state = step_lib.init_state(model, opt, x, 0, mesh)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    state = state.replace(
        decor=jax.device_put(_skewed(state.decor, jax.random.key(3)), mesh_lib.replicated(mesh))
    )
    before = jax.device_get(state)
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule=update_rule,
        loss="ce",
        seed=5,
        global_batch=64,
        decorrelate_lr=lr_d,
        np=NPSettings(sigma=1e-3, **options),
    )
    after, _ = step(state, *mesh_lib.global_batch(mesh, x, y))
    return model, before, jax.device_get(after), x, y


def _rule(r, inputs, lr_d):
    """The rule written out: R - lr_d * offdiag(mean of x' x'^T) R, x' = R x."""
    xp = inputs @ r.T
    c = xp.T @ xp / len(xp)
    return r - lr_d * (c - np.diag(np.diag(c))) @ r, xp


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_sgd_step_is_the_gradient_with_R_fixed_and_R_takes_its_rule():
    """On 8 devices: W moves by jax.grad at the step's R; each R by the rule over the GLOBAL
    batch, on its own layer's input (decor1 reads the hidden layer's ReLU)."""
    with jax.enable_x64(True):
        model, before, after, x, y = _one_step("sgd", 8)
        variables = {"params": before.params, decorrelation.DECOR: before.decor}
        grad = jax.grad(
            lambda p: jnp.mean(losses.ce(model.apply({**variables, "params": p}, x), y))
        )(before.params)
        for a, b, g in zip(
            jax.tree.leaves(before.params), jax.tree.leaves(after.params), jax.tree.leaves(grad)
        ):
            np.testing.assert_allclose(a - b, g, rtol=1e-9, atol=1e-12)
        r0, r1 = before.decor["decor0"]["R"], before.decor["decor1"]["R"]
        want0, xp = _rule(r0, x, 0.05)
        hidden = np.maximum(
            xp @ before.params["layer0"]["kernel"] + before.params["layer0"]["bias"], 0
        )
        want1, _ = _rule(r1, hidden, 0.05)
        np.testing.assert_allclose(after.decor["decor0"]["R"], want0, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(after.decor["decor1"]["R"], want1, rtol=1e-10, atol=1e-12)
        assert not np.allclose(want0, r0)


MESH_CASES = {  # name: (update rule, _one_step's options)
    "np": ("np", {}),
    "sgd": ("sgd", {}),
    "np-conv": ("np", dict(network="conv", shape=(6, 6, 2))),
    "np-local": ("np", dict(np_local=True)),
    "np-layerwise-2-draws-microbatches": (
        "np",
        dict(np_layerwise=True, np_draws=2, np_microbatches=2),
    ),
    "np-original-estimator": ("np", dict(np_estimator="original")),
}


@pytest.mark.parametrize("case", list(MESH_CASES))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_same_step_on_1_and_8_devices_float64(case):
    """W and R after one step agree to ~1e-12 between 1 and 8 devices, with each NP option."""
    update_rule, options = MESH_CASES[case]
    with jax.enable_x64(True):
        _, before, one, _, _ = _one_step(update_rule, 1, **options)
        _, _, eight, _, _ = _one_step(update_rule, 8, **options)
    for a, b, c in zip(
        jax.tree.leaves((one.params, one.decor)),
        jax.tree.leaves((eight.params, eight.decor)),
        jax.tree.leaves((before.params, before.decor)),
    ):
        change = np.linalg.norm(a - c)
        assert change > 0
        assert np.linalg.norm(a - b) / change < 1e-9


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(decorrelate_lr=1e-3), "--decorrelate_lr is the rate of --decorrelate"),
        (dict(decorrelate=True, decorrelate_lr=0.0), "--decorrelate_lr=0 must be positive"),
        (dict(decorrelate=True, network="resnet"), "--decorrelate is built for"),
    ],
)
def test_nonsense_combinations_are_one_line_errors(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message) as e:
        Config(workdir=str(tmp_path), **settings).validate()
    assert "\n" not in str(e.value)


def test_experiment_hooks_refuse_decorrelate_in_one_line(tmp_path):
    """The gradient-statistics and delta-loss hooks compile their model once; R moves every
    step, so they refuse a decorrelated run at its start instead of failing inside flax."""
    from types import SimpleNamespace

    from nodepert_dist.experiments import delta_loss, probes

    ctx = SimpleNamespace(cfg=None, state=SimpleNamespace(decor={"decor0": {"R": np.eye(2)}}))
    for hook in (
        probes.Hook(str(tmp_path / "g.jsonl"), every=1),
        delta_loss.Hook(str(tmp_path / "d.jsonl"), per_epoch=1, window=1),
    ):
        with pytest.raises(ValueError, match="does not take --decorrelate; drop it") as e:
            hook.start(ctx)
        assert "\n" not in str(e.value)
