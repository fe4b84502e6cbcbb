"""The NP estimator pinned to its exact value, deterministically, in float64.

The Monte-Carlo tests (test_estimator.py, test_variance.py) accept anything within a few per cent
of the gradient, so a 10% scale error, a forgotten 1/K or a noise shared across draws passes
them. Here a tiny MLP (one hidden layer: 2 taps, 5 nodes per example) runs every combination of the estimator's
options, and each estimate must equal, to float64 rounding, an independent transcription of
docs/design/estimator.md written with explicit matrices below (no taps, no flax), fed with noise
from keys derived by hand from (seed, step, example, draw, tap). What that reference is worth is
shown by enumeration: averaged over all 2^5 Rademacher sign patterns of every example, its jvp
form is exactly the backprop gradient, and on a linear net with a quadratic loss so is its
antithetic form.
"""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, optim, perturbation
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings

B, D_IN, HIDDEN, CLASSES = 4, 3, 3, 2  # one hidden layer: 5 nodes per example
# A large sigma, so the options' finite-sigma differences show; a power of 2, so sigma * xi is
# exact in the float32 the noise is drawn in (0.1 * xi would be rounded there: 1e-8 relative).
SEED, STEP, SIGMA = 5, 7, 2.0**-3
TAPS = ("tap0", "tap1")


def _tiny(network="fc"):
    """The model, float64 parameters, inputs and labels (inside jax.enable_x64)."""
    model = models.build_model(network, CLASSES, n_hl=1, hl_size=HIDDEN).clone(dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (B, D_IN), jnp.float64)
    y = jnp.arange(B) % CLASSES
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(
        lambda p: (
            p.astype(jnp.float64) + 0.3 * jax.random.normal(jax.random.key(2), p.shape, jnp.float64)
        ),
        params,
    )  # non-zero biases: every parameter's update is tested
    return model, params, x, y


# ----------------------------------------------------------------------------- the noise, by hand


def _hand_noise(seed, step, draw, kind, examples=range(B)):
    """{tap: (B, nodes)} from keys built by hand: key(seed) -> 2 (the noise stream) -> step ->
    example -> draw (if > 0) -> crc32 of the tap's path; Rademacher bit j of word w is node
    j W + w of the tap's W words (+1 for a set bit)."""
    widths = {"tap0": HIDDEN, "tap1": CLASSES}
    noise = {}
    with jax.threefry_partitionable(False):
        for tap, n in widths.items():
            rows = []
            for i in examples:
                k = jax.random.fold_in(
                    jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step), i
                )
                k = jax.random.fold_in(k, draw) if draw else k
                k = jax.random.fold_in(k, zlib.crc32(tap.encode()) & 0x7FFFFFFF)
                if kind == "rademacher":
                    words = np.asarray(jax.random.bits(k, ((n + 31) // 32,), jnp.uint32))
                    bits = (words[None, :] >> np.arange(32, dtype=np.uint32)[:, None]) & 1
                    rows.append(2.0 * bits.reshape(-1)[:n] - 1.0)
                else:
                    rows.append(np.asarray(jax.random.normal(k, (n,), jnp.float32)))
            noise[tap] = np.asarray(rows, np.float64)
    return noise


# ----------------------------------------------------------------------------- the reference


def _layers(params):
    return [(params[f"layer{l}"]["kernel"], params[f"layer{l}"]["bias"]) for l in range(len(TAPS))]


def _forward(params, x, eps, act):
    """(logits, {tap: pre-activation}) with eps[tap] added at the tap's pre-activation."""
    h, pre = x, {}
    for l, (w, b) in enumerate(_layers(params)):
        a = h @ w + b + eps.get(TAPS[l], 0.0)
        pre[TAPS[l]] = a
        h = act(a) if l < len(TAPS) - 1 else a
    return h, pre


def reference(
    params,
    x,
    y,
    loss_fn,
    noise_draws,
    *,
    sigma,
    antithetic=False,
    delta="finite",
    layerwise=False,
    act=jax.nn.relu,
    normalizer=B,
):
    """docs/design/estimator.md's update for this MLP, one draw after another:
    g_l = 1/(K B) sum_draws sum_i (delta_i / sigma) outer(input of layer l in replay, xi_l,i),
    bias: the same without the input. Replay: the noisy pass's pre-activations (antithetic: the
    mean of the +/- passes; jvp: the clean ones)."""
    loss = lambda eps: loss_fn(_forward(params, x, eps, act)[0], y)
    grads = jax.tree.map(jnp.zeros_like, params)
    groups = [[t] for t in TAPS] if layerwise else [list(TAPS)]
    for xi in noise_draws:
        for group in groups:
            if delta == "jvp":  # delta_i / sigma = sum over the group's taps of <dL_i/da, xi>
                slopes = jax.grad(lambda e: jnp.sum(loss(e)))(
                    {t: jnp.zeros((B, xi[t].shape[1])) for t in TAPS}
                )
                rate = sum(jnp.sum(slopes[t] * xi[t], axis=1) for t in group)
                values = _forward(params, x, {}, act)[1]
            else:
                plus = {t: sigma * xi[t] for t in group}
                _, values = _forward(params, x, plus, act)
                if antithetic:
                    minus = {t: -sigma * xi[t] for t in group}
                    _, values_minus = _forward(params, x, minus, act)
                    values = {t: (values[t] + values_minus[t]) / 2 for t in TAPS}
                    rate = (loss(plus) - loss(minus)) / 2 / sigma
                else:
                    rate = (loss(plus) - loss({})) / sigma
            coef = rate / (normalizer * len(noise_draws))
            for t in group:
                l = TAPS.index(t)
                inputs = x if l == 0 else act(values[TAPS[l - 1]])
                cot = coef[:, None] * xi[t]
                grads[f"layer{l}"]["kernel"] += inputs.T @ cot
                grads[f"layer{l}"]["bias"] += jnp.sum(cot, axis=0)
    return grads


# ----------------------------------------------------------------------------- the pins


def _assert_equal(actual, expected, rtol=1e-10):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-13, err_msg=jax.tree_util.keystr(path))


# Every combination of the options that change the estimate, (delta, antithetic) x draws x
# layerwise x noise (24), each run under one of the four layouts, mode x microbatches, which
# must not change it. The layout is the sum of the other options' indices mod 4: each layout
# meets every value of every other option (a covering design; the full 96-way product took
# 4x as long, each call ~1 s of eager dispatch, and adds no pair that this one misses).
_MATH = list(itertools.product(range(3), range(2), range(2), range(2)))
_LAYOUTS = list(itertools.product(perturbation.NP_MODES, [1, 2]))
COMBOS = [
    dict(
        delta=("finite", "finite", "jvp")[i],
        antithetic=i == 1,
        draws=(1, 2)[k],
        layerwise=bool(lw),
        mode=_LAYOUTS[(i + k + lw + n) % 4][0],
        microbatches=_LAYOUTS[(i + k + lw + n) % 4][1],
        noise_kind=perturbation.NOISE_KINDS[n],
    )
    for i, k, lw, n in _MATH
]
assert len(_LAYOUTS) == 4 and len(perturbation.NOISE_KINDS) == 2


def _combo_id(c):
    return "-".join(
        [
            c["delta"],
            "anti" if c["antithetic"] else "one",
            f"K{c['draws']}",
            "layerwise" if c["layerwise"] else "global",
            c["mode"],
            f"mb{c['microbatches']}",
            c["noise_kind"],
        ]
    )


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_every_option_combination_equals_the_exact_estimate():
    """Every estimate-changing combination (24), each under a layout, against the reference."""
    with jax.enable_x64(True):
        model, params, x, y = _tiny()
        keys = perturbation.example_keys(SEED, STEP, jnp.arange(B))
        clean_loss = losses.mse(_forward(params, x, {}, jax.nn.relu)[0], y)
        noise, expected = {}, {}  # the reference ignores mode and microbatches: computed once
        wrong = []
        for combo in COMBOS:
            grads, example_loss, _ = perturbation.np_gradient(
                model, params, x, y, losses.mse, sigma=SIGMA, keys=keys, normalizer=B, **combo
            )
            kind, k = combo["noise_kind"], combo["draws"]
            math = (kind, k, combo["antithetic"], combo["delta"], combo["layerwise"])
            if math not in expected:
                draws = [
                    noise.setdefault((kind, d), _hand_noise(SEED, STEP, d, kind)) for d in range(k)
                ]
                expected[math] = reference(
                    params,
                    x,
                    y,
                    losses.mse,
                    draws,
                    sigma=SIGMA,
                    antithetic=combo["antithetic"],
                    delta=combo["delta"],
                    layerwise=combo["layerwise"],
                )
            try:
                _assert_equal(grads, expected[math])
                if not combo["antithetic"]:  # the step's metrics: the clean per-example loss
                    np.testing.assert_allclose(example_loss, clean_loss, rtol=1e-12)
            except AssertionError as e:
                leaf = next((l for l in str(e).splitlines() if l.startswith("[")), "the loss")
                wrong.append(f"{_combo_id(combo)}: {leaf}")
        assert not wrong, f"{len(wrong)} of {len(COMBOS)} combinations wrong:\n" + "\n".join(wrong)


def test_the_train_step_uses_the_runs_seed_and_step():
    """The sharded step with lr 1 (params0 - params1 = the update) on 1 and 8 devices equals the
    reference with the noise of the run's seed and the state's step: a seed or step left out of
    the keys anywhere between the step and the draw fails here."""
    with jax.enable_x64(True):
        model, params, x, y = _tiny()
        params0 = jax.device_get(params)  # the step donates its state
        opt = optim.make_optimizer("sgd", 1.0, 0.0)
        for devices, options in ((1, dict(np_layerwise=True, np_draws=2)), (8, {})):
            mesh = mesh_lib.make_mesh(jax.devices()[:devices])
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            state = jax.device_put(
                step_lib.TrainState(
                    step=jnp.int32(STEP), params=params, opt_state=opt.init(params)
                ),
                rep,
            )
            # 8 devices need 8 examples: the batch twice (examples 4-7 get their own noise)
            xs, ys = (x, y) if devices == 1 else (jnp.concatenate([x, x]), jnp.concatenate([y, y]))
            step = step_lib.make_train_step(
                model,
                opt,
                mesh,
                update_rule="np",
                loss="mse",
                seed=SEED,
                global_batch=len(xs),
                np=NPSettings(sigma=SIGMA, **options),
            )
            new, _ = step(state, *mesh_lib.global_batch(mesh, np.asarray(xs), np.asarray(ys)))
            update = jax.tree.map(lambda a, b: a - b, params0, jax.device_get(new.params))
            k = options.get("np_draws", 1)
            if devices == 1:
                expected = reference(
                    params,
                    x,
                    y,
                    losses.mse,
                    [_hand_noise(SEED, STEP, d, "rademacher") for d in range(k)],
                    sigma=SIGMA,
                    layerwise=True,
                )
            else:  # examples 4..7: the noise of global indices 4..7
                halves = [_hand_noise(SEED, STEP, 0, "rademacher", range(o, o + B)) for o in (0, B)]
                expected = jax.tree.map(
                    lambda a, b: (a + b) / 2,
                    *[reference(params, x, y, losses.mse, [h], sigma=SIGMA) for h in halves],
                )
            _assert_equal(update, expected, rtol=1e-9)


def test_the_noise_depends_on_the_seed():
    """Two seeds, same step and examples: different noise, and different updates."""
    a, b = (
        perturbation.draw_noise(
            perturbation.example_keys(s, STEP, jnp.arange(B)), {"t": (64,)}, "gaussian"
        )["t"]
        for s in (0, 1)
    )
    assert not np.allclose(a, b)
    with jax.enable_x64(True):
        model, params, x, y = _tiny()
        u, v = (
            perturbation.np_gradient(
                model,
                params,
                x,
                y,
                losses.mse,
                sigma=SIGMA,
                keys=perturbation.example_keys(s, STEP, jnp.arange(B)),
                normalizer=B,
            )[0]
            for s in (0, 1)
        )
        assert not np.allclose(u["layer0"]["kernel"], v["layer0"]["kernel"])


# ----------------------------------------------------------------------------- the reference's worth


def _all_sign_patterns():
    """Every example gets every one of the 2^5 sign patterns of its 5 nodes: 32 x {tap: (B, n)}."""
    patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=HIDDEN + CLASSES)))
    cut = np.cumsum([0, HIDDEN, CLASSES])
    return [
        {
            t: np.broadcast_to(p[cut[l] : cut[l + 1]], (B, cut[l + 1] - cut[l]))
            for l, t in enumerate(TAPS)
        }
        for p in patterns
    ]


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_references_expectation_is_the_gradient(layerwise):
    """Exact expectations by enumeration (E[xi xi^T] = I for Rademacher signs):
    the jvp form on the ReLU net with mse, and the antithetic form on the linear net with a
    loss quadratic in the logits (the loss change is then g.xi + even terms that cancel, and
    replay at the pair's mean is the clean pass), both equal jax.grad of the mean loss. The
    one-sided form with every tap perturbed at once does not (its replay inputs carry the
    upstream taps' noise: an O(sigma^2) bias)."""
    with jax.enable_x64(True):
        model, params, x, y = _tiny()
        patterns = _all_sign_patterns()
        mean = lambda **kw: jax.tree.map(
            lambda *g: sum(g) / len(g),
            *[
                reference(
                    params,
                    x,
                    y,
                    kw["loss_fn"],
                    [p],
                    sigma=SIGMA,
                    layerwise=layerwise,
                    **{k: v for k, v in kw.items() if k != "loss_fn"},
                )
                for p in patterns
            ],
        )
        true = jax.grad(lambda p: jnp.mean(losses.mse(model.apply({"params": p}, x), y)))(params)
        _assert_equal(mean(loss_fn=losses.mse, delta="jvp"), true, rtol=1e-10)

        quadratic = lambda logits, labels: (
            0.5 * jnp.sum((logits - jax.nn.one_hot(labels, CLASSES)) ** 2, axis=-1)
        )
        linear = lambda h: h
        lin = models.build_model("linfc", CLASSES, n_hl=1, hl_size=HIDDEN).clone(dtype=jnp.float64)
        true = jax.grad(lambda p: jnp.mean(quadratic(lin.apply({"params": p}, x), y)))(params)
        _assert_equal(mean(loss_fn=quadratic, antithetic=True, act=linear), true, rtol=1e-10)
        if not layerwise:  # (layer-wise, each tap's input is clean: exact too)
            with pytest.raises(AssertionError):
                _assert_equal(mean(loss_fn=quadratic, act=linear), true, rtol=1e-6)
