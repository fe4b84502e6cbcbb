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


@pytest.mark.parametrize(
    "shape, words, node",
    [
        ((70,), 3, lambda i: (i % 3, i // 3)),  # rows only: R = 3 words per bit
        ((28, 8), 8, lambda i: (i % 8, i // 8)),  # 8 words, not ceil(224 / 32) = 7: bit = row
        ((28, 3), 3, lambda i: (i % 3, i // 3)),  # rows (28) by columns (3): bit row, word col
        # R = 2: row i takes word (i % 2) C + c
        ((60, 2), 4, lambda i: ((i // 2 % 2) * 2 + i % 2, i // 4)),
    ],
)
def test_rademacher_sign_layout_by_hand(shape, words, node):
    """The sign layout, pinned by hand from jax.random.bits (noise._sign_layout): node (row i,
    column c) is bit i // R of word (i % R) C + c; `node(flat index)` is its (word, bit)."""
    keys = noise.example_keys(1, jnp.int32(2), jnp.arange(3))
    (got,) = noise.draw_noise(keys, {"t": shape}).values()
    assert got.shape == (3, *shape)
    for i in range(3):
        with jax.threefry_partitionable(False):
            bits = jax.random.bits(jax.random.fold_in(keys[i], taps.tap_id("t")), (words,))
        bits = np.asarray(bits)
        want = [1.0 if (bits[node(j)[0]] >> node(j)[1]) & 1 else -1.0 for j in range(got[i].size)]
        np.testing.assert_array_equal(np.asarray(got[i]).reshape(-1), want)
