"""On the CPU, compile threefry as straight-line array ops instead of a loop.

jax lowers its threefry2x32 hash to a 5-iteration while loop on the CPU (to keep programs small)
and to the unrolled rounds elsewhere. XLA's CPU compiler (jaxlib 0.10.2) takes ~0.3-1 CPU s per
such loop, so every random draw in a program cost compile time: the ResNet's `init` compiled in
13 CPU s, 2.5 with the rounds unrolled (docs/results/compile_time.md). Registering jax's own
unrolled lowering for the CPU changes how the hash is compiled, not what it computes: the same
bits (tests/test_threefry_cpu.py checks the known-answer vectors and a program has no loop).
Imported by taps.py, which models.py and noise.py import: in place before anything is lowered.
"""

from functools import partial

import jax
from jax._src.random.threefry2x32 import _threefry2x32_lowering  # the hash as array ops
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

mlir.register_lowering(
    threefry2x32_p,
    mlir.lower_fun(partial(_threefry2x32_lowering, use_rolled_loops=False), multiple_results=True),
    platform="cpu",
)


@jax.jit
def threefry_rolled(key1, key2, x1, x2):
    """The hash as jax's loop on every platform: for one hash that many consumers slice
    (noise.draw_noise), which XLA would otherwise fuse into, and compile in, each of them."""
    return _threefry2x32_lowering(key1, key2, x1, x2, use_rolled_loops=True)
