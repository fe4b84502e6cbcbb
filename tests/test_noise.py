"""The noise streams (noise.py): the one-call draw of every tap is jax.random's draw tap by tap,
bit for bit, and the keys are jax.random.fold_in's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import noise, taps

# Odd and even word counts, a single node, exactly 32 and 64 nodes, multi-dimensional taps.
SHAPES = {"a/tap0": (7,), "b/tap": (5, 3), "c": (33,), "d": (64,), "e": (1,), "f": (2, 3, 5)}


def _bits(tree):
    return {k: np.asarray(v).view(np.uint32) for k, v in tree.items()}


@pytest.mark.parametrize("kind", noise.NOISE_KINDS)
def test_draw_noise_is_jax_random_tap_by_tap(kind):
    keys = noise.draw_keys(noise.example_keys(3, jnp.int32(7), jnp.arange(5)), 2)
    reference = {n: noise.draw_layer(keys, taps.tap_id(n), s, kind) for n, s in SHAPES.items()}
    eager = noise.draw_noise(keys, SHAPES, kind)
    jitted = jax.jit(lambda k: noise.draw_noise(k, SHAPES, kind))(keys)
    want = _bits(reference)
    for got in (_bits(eager), _bits(jitted)):
        assert list(got) == list(SHAPES)
        for name in SHAPES:
            assert got[name].shape == (5, *SHAPES[name])
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("x64", [False, True])
def test_keys_are_jax_random_fold_in(x64):
    with jax.enable_x64(x64):
        index = jnp.arange(40)
        for seed, step in ((0, 0), (5, 7), (123456, 2**31 - 1)):
            root = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
            want = jax.vmap(lambda i: jax.random.fold_in(root, i))(index)  # noqa: B023
            by_seed = jax.jit(lambda s, t: noise.example_keys(s, t, index))  # a traced seed too
            for got in (
                noise.example_keys(seed, jnp.int32(step), index),
                by_seed(jnp.int32(seed), jnp.int32(step)),
            ):
                np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
            draw3 = jax.vmap(lambda k: jax.random.fold_in(k, 3))(want)
            np.testing.assert_array_equal(
                jax.random.key_data(noise.draw_keys(want, 3)), jax.random.key_data(draw3)
            )


def test_rademacher_node_j_w_plus_w_takes_bit_j_of_word_w():
    """The sign layout, pinned by hand from jax.random.bits: node j W + w of a tap with W words
    is bit j of word w (bit-major; word-major layouts cost LLVM ~0.2 CPU s per kernel on 16- and
    32-channel taps, noise._signs). 70 nodes: W = 3, and a last, partly used bit row."""
    keys = noise.example_keys(1, jnp.int32(2), jnp.arange(3))
    (got,) = noise.draw_noise(keys, {"t": (70,)}).values()
    for i in range(3):
        with jax.threefry_partitionable(False):
            words = np.asarray(jax.random.bits(jax.random.fold_in(keys[i], taps.tap_id("t")), (3,)))
        want = [1.0 if (words[j % 3] >> (j // 3)) & 1 else -1.0 for j in range(70)]
        np.testing.assert_array_equal(np.asarray(got[i]), want)
