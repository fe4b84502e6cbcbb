"""Random crop with zero padding and horizontal flip, a pure function of (seed, epoch, example).

Each example's draw comes from a counter-based hash (splitmix64) of (seed, epoch, dataset row),
not from an RNG stream, so the same example gets the same crop and flip in any batch position,
on any process, after any restart.
"""

from __future__ import annotations

import numpy as np

PAD = 4  # pixels of zero padding on each side before the crop (the usual CIFAR recipe)

_M1, _M2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (multiplication wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def example_bits(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """64 random bits per example row, a pure function of (seed, epoch, row)."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & (2**64 - 1)], np.uint64) + _GOLDEN)
        key = _mix(key ^ np.uint64(epoch & (2**64 - 1)))
        return _mix(key ^ (np.asarray(rows, np.uint64) * _GOLDEN))


def crop_flip(images: np.ndarray, bits: np.ndarray, pad: int = PAD) -> np.ndarray:
    """Pads each (H, W, C) image with `pad` zeros, crops back to H x W at an offset drawn from
    `bits`, and flips it left-right when a third draw says so. uint8 in, uint8 out.

    Done without materialising the padded batch: each output image is zeros plus one copied
    window of its input (~0.8 ms per 128 CIFAR images here, vs 2 ms for a fancy-index gather).
    """
    b, h, w, _ = images.shape
    span, low16 = np.uint64(2 * pad + 1), np.uint64(0xFFFF)
    sy = ((bits & low16) % span).astype(np.int64) - pad  # row shift in [-pad, pad]
    sx = (((bits >> np.uint64(16)) & low16) % span).astype(np.int64) - pad
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
    out = np.zeros_like(images)
    for i in range(b):
        # output row r shows input row r + sy (zero where that is outside the image); same for columns
        dst = out[i, max(0, -sy[i]) : h - max(0, sy[i]), max(0, -sx[i]) : w - max(0, sx[i])]
        dst[...] = images[i, max(0, sy[i]) : h + min(0, sy[i]), max(0, sx[i]) : w + min(0, sx[i])]
        if flip[i]:
            out[i] = out[i, :, ::-1]
    return out
