"""Perturbation noise streams: counter-based keys and the draw of every tap's noise.

`stream_key(seed, name)` separates parameter initialisation from the noise; the noise of example
`i` at update `step` is keyed key(seed) -> "noise" tag -> step -> global example index i ->
tap (taps.tap_id of its name). A device draws only the noise of the examples it holds, with no
communication, and an example's noise does not depend on how the batch is laid out over devices
or processes.

Tap t of example i is `jax.random.bits` (Rademacher: 32 signs per word) or `jax.random.normal`
of `fold_in(key_i, tap_id(t))`, in threefry's non-partitionable form (`draw_layer`).
`draw_noise` computes exactly those values (tests/test_noise.py), Rademacher in one threefry
call for every tap and example, and the keys with jax's threefry written out in array ops (what
jax lowers it to on GPUs). On the CPU jax lowers each threefry call to a loop that XLA took ~0.2-0.3 s
(CPU time) to compile: drawn tap by tap, with a loop per key too, the noise alone made NP's
compile time grow with depth (docs/results/compile_time.md).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.random.threefry2x32 import _threefry2x32_lowering  # the hash as array ops

from nodepert_dist import taps
from nodepert_dist.threefry_cpu import threefry_rolled

NOISE_KINDS = ("rademacher", "gaussian")
_STREAMS = {"init": 1, "noise": 2}  # one tag per jax random stream of a run (data order: numpy)


def stream_key(seed: int, stream: str):
    """The root key of one random stream of a run: streams never share a key."""
    return jax.random.fold_in(jax.random.key(seed), _STREAMS[stream])


def step_key(seed: int, step):
    """The noise key of update `step`: the example keys fold each example's index into it; the
    original estimator draws its one batch-wide noise from it directly."""
    # A constant of the step when the seed is one. Not for a traced seed: a population member's
    # varies over the mesh's `member` axis, and jax cannot make an eager constant vary with it.
    fold = not isinstance(seed, jax.core.Tracer)
    with jax.ensure_compile_time_eval() if fold else contextlib.nullcontext():
        root = stream_key(seed, "noise")
    return _fold_in(root, step)


def example_keys(seed: int, step, global_index):
    """One noise key per example, from (seed, step, global example index)."""
    return _fold_in(step_key(seed, step)[None], global_index)


def draw_keys(keys, draw: int):
    """The example keys of noise draw `draw`: draw 0 is the keys themselves (today's noise)."""
    return keys if draw == 0 else _fold_in(keys, draw)


def _fold_in(keys, data):
    """jax.random.fold_in(k, d) for threefry keys `keys` and integer `data` broadcast against
    them: the hash of the counter pair (0, d) under k, written out in array ops."""
    k = jax.random.key_data(keys)
    d = jnp.asarray(data).astype(jnp.uint32)
    h1, h2 = _threefry2x32_lowering(
        k[..., 0], k[..., 1], jnp.zeros_like(d), d, use_rolled_loops=False
    )
    return jax.random.wrap_key_data(jnp.stack([h1, h2], -1), impl=jax.random.key_impl(keys))


def _check(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown --noise={kind!r}; choose one of {', '.join(NOISE_KINDS)}")


def draw_layer(keys, layer: int, shape, kind: str = "rademacher"):
    """Unit-variance, zero-mean noise of one tap's nodes for every example: (b, *shape), from
    jax.random itself (draw_noise's reference; keys of another PRNG implementation)."""
    _check(kind)

    def draw(k):
        k = jax.random.fold_in(k, layer)
        if kind == "gaussian":
            return jax.random.normal(k, tuple(shape), jnp.float32)
        words = jax.random.bits(k, (_sign_layout(shape)[1],), jnp.uint32)
        return _signs(words[None], shape)[0]

    # Each device draws whole examples from their own keys, so threefry need not be
    # partitionable; the non-partitionable form fused better on XLA CPU (measured: conv layer
    # shapes, B=128, Gaussian: ~2.5x faster, 64 -> 37 MB temp).
    with jax.threefry_partitionable(False):
        return jax.vmap(draw)(keys)


def draw_noise(keys, shapes: dict, kind: str = "rademacher") -> dict:
    """Every tap's noise, {tap name: (b, *shape)}, each from the tap's own stream: draw_layer's
    values, in one threefry call for all taps (module docstring)."""
    _check(kind)
    if not shapes:
        return {}
    # Gaussian noise takes a word per node: hashed at once, the words, their keys and the
    # normals of every tap were alive together (conv-large temp memory 236 -> 561 MB), so it is
    # drawn tap by tap; Rademacher's words are 1/32 of its nodes.
    threefry = jax.random.key_impl(jax.random.key(0, impl="threefry2x32"))
    if kind == "gaussian" or jax.random.key_impl(keys) != threefry:
        return {name: draw_layer(keys, taps.tap_id(name), s, kind) for name, s in shapes.items()}
    words = [_sign_layout(s)[1] for s in shapes.values()]
    bits = _threefry_words(keys, [taps.tap_id(name) for name in shapes], words)
    return {name: _signs(w, shape) for (name, shape), w in zip(shapes.items(), bits)}


def _threefry_words(keys, data: list, counts: list) -> list:
    """[jax.random.bits(fold_in(k, data[t]), (counts[t],), uint32) for every key k: (b,
    counts[t])] for each t, non-partitionable, as two threefry2x32 hashes over all of them.
    fold_in(k, d) is the hash of the counter pair (0, d) under k. bits(k, (n,)) hashes the
    counters 0..n-1 as pairs (j, j + m), m = ceil(n / 2), the odd count's last pair (m - 1, 0),
    and its words are the pairs' first halves, then their second halves."""
    tap_keys = jax.random.key_data(_fold_in(keys[:, None], np.asarray(data, np.uint32)[None]))
    t1, t2 = tap_keys[..., 0], tap_keys[..., 1]  # (b, taps)
    halves = [(n + 1) // 2 for n in counts]
    first = np.concatenate([np.arange(m, dtype=np.uint32) for m in halves])
    second = np.concatenate(
        [
            np.arange(m, 2 * m, dtype=np.uint32) * (np.arange(m) < n - m)
            for n, m in zip(counts, halves)
        ]
    )
    tap = np.repeat(np.arange(len(counts)), halves)  # the tap of each counter pair
    # A loop, unlike every other hash on the CPU (threefry_cpu): unrolled, XLA fused the rounds
    # into each tap's slice and compiled them once per tap (resnet NP 6.3 -> 9.1 CPU s).
    h1, h2 = threefry_rolled(
        t1[:, tap], t2[:, tap], jnp.asarray(first)[None], jnp.asarray(second)[None]
    )
    out, start = [], 0
    for n, m in zip(counts, halves):
        pairs = slice(start, start + m)
        out.append(jnp.concatenate([h1[:, pairs], h2[:, pairs]], axis=1)[:, :n])
        start += m
    return out


def _sign_layout(shape) -> tuple[int, int]:
    """(k, words) of a tap of this per-example shape: its nodes are rows (the first k axes, L
    of them) by columns (the other axes, C); row i takes bit i // R of the words of row i % R,
    R = ceil(L / 32), so node (i, c) is bit i // R of word (i % R) C + c. k is the first whose
    words are within 1/4 of the fewest, ceil(nodes / 32) (k = every axis): a row's bit and
    word row are then worked out once per row, not per node in the innermost loop."""
    shape = tuple(shape) or (1,)
    fewest = -(-math.prod(shape) // 32)
    for k in range(1, len(shape) + 1):
        words = -(-math.prod(shape[:k]) // 32) * math.prod(shape[k:])
        if 4 * words <= 5 * fewest:
            return k, words
    raise AssertionError("unreachable: k = len(shape) takes the fewest words")


def _signs(words, shape):
    """The tap's random signs (float32 +-1), (b, *shape), from its (b, words) uint32 words laid
    out by _sign_layout: ~40x cheaper on the CPU than threefry normals. Neighbouring nodes of
    the last axes take the same bit of neighbouring words, so the unpacking kernels vectorise
    over words with one shift, and no kernel splits a word's 32 bits over an axis: a tap with
    16 or 32 channels on the last axis, one word per 32 channels, put 32 constant shifts in
    XLA's innermost loop, and LLVM took ~0.2 CPU s to compile each of its unpacking kernels
    (conv: 6 kernels, 1.3 of NP's 2.9 CPU s of compile; docs/results/compile_time.md)."""
    shape = tuple(shape)
    k, _ = _sign_layout(shape)
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    per_row = -(-rows // 32)  # R
    bits = (
        words.reshape(-1, 1, per_row, cols) >> jnp.arange(32, dtype=jnp.uint32)[:, None, None]
    ) & 1
    signs = bits.reshape(-1, 32 * per_row, cols)[:, :rows].astype(jnp.float32) * 2.0 - 1.0
    return signs.reshape(-1, *shape)
