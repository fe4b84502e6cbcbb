"""taps.check refuses what NP cannot train, by name; tap noise streams are named by the tap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, perturbation, taps
from nodepert_dist.taps import Tap

X = jnp.ones((4, 8, 8, 1))


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x))
        return Tap()(nn.Dense(10)(nn.relu(Tap()(h)).reshape(x.shape[0], -1)))


class UntappedReadout(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(Tap()(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(10, name="readout")(h.reshape(x.shape[0], -1))


class ScaleAfterLastTap(nn.Module):
    @nn.compact
    def __call__(self, x):
        logits = Tap()(nn.Dense(10)(x.reshape(x.shape[0], -1)))
        return logits * self.param("temperature", nn.initializers.ones, ())


class NoTaps(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TapTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        tap = Tap(name="shared")
        h = nn.relu(tap(nn.Dense(8)(x.reshape(x.shape[0], -1))))
        return tap(nn.Dense(10)(h))


def _check(model):
    params = model.init(jax.random.key(0), X)["params"]
    taps.check(model, params, X)


@pytest.mark.parametrize(
    "model, message",
    [
        (BatchNormNet(), "uses batch norm: batch statistics mix the examples"),
        (UntappedReadout(), "parameter readout/bias reaches no Tap"),
        (ScaleAfterLastTap(), "parameter temperature reaches no Tap"),
        (NoTaps(), "has no Tap"),
        (TapTwice(), "tap shared is called twice"),
    ],
)
def test_check_refuses_with_one_named_line(model, message):
    with pytest.raises(ValueError, match=message) as e:
        if isinstance(model, BatchNormNet):  # init needs a mutable batch_stats collection
            taps.check(model, {}, X)
        else:
            _check(model)
    assert "\n" not in str(e.value).split("----")[0].strip()


def test_untapped_count_is_reported():
    with pytest.raises(ValueError, match=r"readout/bias reaches no Tap.*\(nor 1 more\)"):
        _check(UntappedReadout())


@pytest.mark.parametrize("network", models.NETWORKS)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_every_zoo_model_passes_the_check(network):
    model = models.build_model(network, 10, n_hl=1, hl_size=8, width=2, norm="group")
    params = model.init(jax.random.key(0), X)["params"]
    taps.check(model, params, X)
    assert len(taps.tap_shapes(model, params, X)) >= 2


def test_np_step_refuses_an_untapped_model():
    model = UntappedReadout()
    params = model.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="readout/bias reaches no Tap"):
        perturbation.np_gradient(
            model,
            params,
            X,
            jnp.zeros(4, jnp.int32),
            losses.ce,
            sigma=1e-3,
            keys=perturbation.example_keys(0, 0, jnp.arange(4)),
            normalizer=4,
        )


def test_adding_a_tap_leaves_the_other_taps_noise_alone():
    keys = perturbation.example_keys(0, 3, jnp.arange(4))
    before = perturbation.draw_noise(keys, {"tap0": (5,), "tap1": (5,)})
    after = perturbation.draw_noise(keys, {"tap0": (5,), "extra": (5,), "tap1": (5,)})
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert not np.array_equal(after["extra"], after["tap0"])


def test_tap_values_and_replay_are_keyed_by_module_path():
    model = models.build_model("resnet", 10, width=2)
    params = model.init(jax.random.key(0), X)["params"]
    shapes = taps.tap_shapes(model, params, X)
    assert list(shapes)[0] == "stem/tap" and list(shapes)[-1] == "readout_tap"
    assert "stage1_block0/shortcut/tap" in shapes
    logits, values = taps.forward(model, params, X)
    np.testing.assert_array_equal(values["readout_tap"], logits)
    # replay with the forward's own values gives back the same pre-activations
    preacts = taps.replay(model, params, X, values)
    for name in shapes:
        np.testing.assert_allclose(preacts[name], values[name], rtol=1e-6, atol=1e-6)
