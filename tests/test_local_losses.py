"""--np_local: block-local losses for the MLP and the conv stacks. Each hidden layer and its
auxiliary readout head (conv: of its spatially averaged output) form a block; NP perturbs one block's taps at a time and uses the change of that block's own
loss. Unbiased for each block's local objective (the block's input held fixed), per option;
the same update on 1 and 8 devices is in tests/test_step.py."""

import jax
import jax.numpy as jnp
import pytest
from test_estimator import BATCH, _assert_unbiased, _np_mean

from nodepert_dist import losses, models, perturbation, taps
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings

OPTIONS = {
    "finite": ({}, 8000),
    "jvp-2-draws": (dict(delta="jvp", draws=2), 4000),
    "antithetic-regen": (dict(antithetic=True, mode="regen"), 8000),
}


def _setup(network="fc"):
    if network == "fc":
        model = models.build_model("fc", 10, n_hl=2, hl_size=16, local_heads=True)
        x = jax.random.normal(jax.random.key(1), (BATCH, 12))
    else:  # the conv stacks' module, narrow: (features, kernel, stride) as conv's, 3/2/4 wide
        model = models.ConvStack(((3, 3, 1), (2, 3, 2), (4, 3, 1)), 10, local_heads=True)
        x = jax.random.normal(jax.random.key(1), (BATCH, 6, 6, 1))
    y = jnp.arange(BATCH) % 10
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x, y


def local_gradient(model, params, x, y, loss_fn):
    """jax.grad of the sum of the blocks' mean losses: each hidden layer's input is
    stop-gradient'ed in the model, so every parameter gets its own block's gradient only."""

    def objective(p):
        logits, values = taps.forward(model, p, x)
        heads = [v for k, v in values.items() if k.startswith(perturbation.HEAD_PREFIX)]
        return sum(jnp.mean(loss_fn(z, y)) for z in [logits, *heads])

    return jax.grad(objective)(params)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_each_block_is_unbiased_for_its_local_objective(option):
    model, params, x, y = _setup()
    assert {"head0", "head1", "layer0", "layer1", "layer2"} == set(params)
    options, samples = OPTIONS[option]
    sigma = 1e-2 if options.get("antithetic") else 1e-4
    true = local_gradient(model, params, x, y, losses.mse)
    mean = _np_mean(model, params, x, y, losses.mse, sigma, samples, local=True, **options)
    _assert_unbiased(mean, true)
    # and it is not the global gradient: the hidden layers follow their own heads' losses
    global_grad = jax.grad(
        lambda p: jnp.mean(
            losses.mse(
                model.clone(local_heads=False).apply(
                    {"params": {k: v for k, v in p.items() if not k.startswith("head")}}, x
                ),
                y,
            )
        )
    )(params)
    with pytest.raises(AssertionError):
        _assert_unbiased({"layer0": mean["layer0"]}, {"layer0": global_grad["layer0"]})


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_conv_blocks_are_unbiased_for_their_local_objective():
    model, params, x, y = _setup("conv")
    assert {"head0", "head1", "head2", "layer0", "layer1", "layer2", "layer3"} == set(params)
    true = local_gradient(model, params, x, y, losses.mse)
    _assert_unbiased(_np_mean(model, params, x, y, losses.mse, 1e-4, 20000, local=True), true)


def test_blocks_are_the_layers_and_their_heads():
    model, params, x, _ = _setup()
    groups, heads = perturbation.local_blocks(taps.tap_shapes(model, params, x))
    assert groups == [["tap0", "head_tap0"], ["tap1", "head_tap1"], ["tap2"]]
    assert heads == ["head_tap0", "head_tap1", None]
    model, params, x, _ = _setup("conv")
    groups, heads = perturbation.local_blocks(taps.tap_shapes(model, params, x))
    assert groups == [[f"tap{i}", f"head_tap{i}"] for i in range(3)] + [["tap3"]]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: perturbation.check_options(layerwise=True, local=True),
            "--np_local perturbs one block at a time already; drop --np_layerwise",
        ),
        (
            lambda: models.build_model("vgg", 10, local_heads=True),
            "--np_local is built for fc, linfc, conv and conv-large, not --network=vgg",
        ),
        (
            lambda: step_lib.local_gradient(
                update_rule="sgd",
                loss="mse",
                seed=0,
                global_batch=8,
                np=NPSettings(sigma=1e-4, np_local=True),
            ),
            "--np_local is node perturbation with block-local losses; drop it with --update_rule=sgd",
        ),
        (
            lambda: perturbation.local_blocks({"tap0": (3,), "tap1": (2,)}),
            "--np_local: tap tap0 has no auxiliary head \\(head_tap0\\)",
        ),
    ],
)
def test_bad_local_settings_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
