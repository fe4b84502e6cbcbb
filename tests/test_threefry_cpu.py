"""threefry_cpu: the CPU compiles threefry without a loop, and the hash is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from nodepert_dist import models  # noqa: F401  (imports taps, which registers the lowering)

# Random123's known-answer vectors for threefry2x32 with 20 rounds: (key, counter, hash).
KNOWN = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def _reference(key, x1, x2):
    """threefry2x32-20 in numpy, written from the Threefry specification."""
    rot = [(13, 15, 26, 6), (17, 29, 16, 24)]
    ks = [np.uint32(key[0]), np.uint32(key[1])]
    ks.append(ks[0] ^ ks[1] ^ np.uint32(0x1BD11BDA))
    x = [x1.astype(np.uint32) + ks[0], x2.astype(np.uint32) + ks[1]]
    for i in range(5):
        for r in rot[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))) ^ x[0]
        x[0] = x[0] + ks[(i + 1) % 3]
        x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x


def test_known_answers_and_the_reference_on_the_cpu():
    hash_ = jax.jit(threefry_2x32)
    for key, counter, expected in KNOWN:
        out = np.asarray(hash_(jnp.asarray(key, jnp.uint32), jnp.asarray(counter, jnp.uint32)))
        assert tuple(int(v) for v in out) == expected
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    counts = rng.integers(0, 2**32, 1000, dtype=np.uint32)
    with np.errstate(over="ignore"):
        want = np.concatenate(_reference(key, counts[:500], counts[500:]))
    np.testing.assert_array_equal(np.asarray(hash_(jnp.asarray(key), jnp.asarray(counts))), want)


def test_a_random_draw_compiles_without_a_loop_on_the_cpu():
    """jax's own CPU lowering is a while loop per hash; XLA took ~0.3-1 CPU s to compile each."""
    assert jax.default_backend() == "cpu"
    program = jax.jit(lambda k: jax.random.normal(k, (64,))).lower(jax.random.key(0)).as_text()
    assert "threefry" in program.lower() or "xor" in program  # the hash is in there
    assert "stablehlo.while" not in program
