"""Preprocessing chosen by flag, as in the research code, applied per batch on the device.

Modes (pixels are first scaled to [0, 1]):
- `unit`: x / 255, nothing else;
- `standardize`: (x - mean) / std with one mean and std over every pixel of the training split;
- `per_channel`: the same per colour channel (the CIFAR default; for 1-channel MNIST the two agree);
- `zca`: ZCA whitening, (x - mean) @ W with W = U diag(1 / sqrt(lambda + ZCA_EPSILON)) U^T from the
  eigendecomposition of the training split's pixel covariance.

Statistics come from the training split only (after any validation hold-out), are computed once in
float64 reading the memory-mapped rows in chunks, and are cached in `<store>/stats/`. Batches stay
uint8 until the device; `device_fn` turns the sharded uint8 global batch into float32 there.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from nodepert_dist import files

MODES = ("auto", "standardize", "per_channel", "unit", "zca")
ZCA_EPSILON = 1e-5  # in [0, 1] pixel units: whitens directions with variance >> 1e-5
CHUNK = 2048  # rows per read while computing statistics


def resolve(mode: str, dataset: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--preprocess={mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "per_channel" if dataset.startswith("cifar") else "standardize"
    return mode


def _chunks(images: np.ndarray, lo: int, hi: int):
    for start in range(lo, hi, CHUNK):
        x = np.asarray(images[start : min(start + CHUNK, hi)], np.float64) / 255.0
        yield x.reshape(len(x), -1, images.shape[-1])  # (rows, pixels, channels)


def compute(images: np.ndarray, mode: str, lo: int, hi: int) -> dict:
    """Float64 statistics of rows [lo, hi) of `images` for `mode` (two passes, chunked)."""
    n = hi - lo
    if mode == "unit":
        return {}
    if mode in ("standardize", "per_channel"):
        axes = (0, 1, 2) if mode == "standardize" else (0, 1)
        count = n * images[0].size / (1 if mode == "standardize" else images.shape[-1])
        mean = sum(x.sum(axis=axes) for x in _chunks(images, lo, hi)) / count
        var = sum(((x - mean) ** 2).sum(axis=axes) for x in _chunks(images, lo, hi)) / count
        std = np.sqrt(var)
        return {"mean": mean, "std": np.where(std > 0, std, 1.0)}
    if mode == "zca":
        if n <= images[0].size:
            logging.warning(
                "ZCA from %d examples of %d values each: the covariance is singular and "
                "directions without training variance get scaled by 1/sqrt(%g)",
                n,
                images[0].size,
                ZCA_EPSILON,
            )
        flat = lambda x: x.reshape(len(x), -1)
        mean = sum(flat(x).sum(axis=0) for x in _chunks(images, lo, hi)) / n
        cov = sum((flat(x) - mean).T @ (flat(x) - mean) for x in _chunks(images, lo, hi)) / n
        eigval, eigvec = np.linalg.eigh(cov)
        w = (eigvec * (1.0 / np.sqrt(np.maximum(eigval, 0.0) + ZCA_EPSILON))) @ eigvec.T
        return {"mean": mean, "w": w}
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def statistics(store_root: str, images: np.ndarray, mode: str, lo: int, hi: int) -> dict:
    """`compute`, cached in `<store_root>/stats/` (written through a temporary file)."""
    eps = f"-eps{ZCA_EPSILON:g}" if mode == "zca" else ""
    path = os.path.join(store_root, "stats", f"{mode}-rows{lo}-{hi}{eps}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError):
            pass  # damaged cache: compute again and replace it
    stats = compute(images, mode, lo, hi)
    try:
        with files.atomic_open(path, "wb") as f:
            np.savez(f, **stats)
    except OSError:  # a read-only data_dir still trains; it just recomputes next time
        pass
    return stats


def apply(x, mode: str, stats: dict, matmul=None):
    """uint8 images (..., H, W, C) -> float32; numpy or jax arrays alike (ops are
    methods/operators). `matmul(a, w)`: zca's product (default a @ w)."""
    x = x.astype("float32") / 255.0
    if mode == "unit":
        return x
    if mode in ("standardize", "per_channel"):
        return (x - stats["mean"]) / stats["std"]
    shape = x.shape  # (..., H, W, C): a batch, or K batches stacked (the train loop's)
    centred = x.reshape(*shape[:-3], -1) - stats["mean"]
    return (centred @ stats["w"] if matmul is None else matmul(centred, stats["w"])).reshape(shape)


def device_fn(mode: str, stats: dict, mesh):
    """Jitted `f(uint8 global batch) -> float32 global batch`, sharded like its input (eval and
    probes; the train loop traces `device_parts` inside its step instead)."""
    import jax

    from nodepert_dist import mesh as mesh_lib

    fn, consts = device_parts(mode, stats, mesh)
    jitted = jax.jit(fn, out_shardings=mesh_lib.batch_sharding(mesh))
    return lambda x: jitted(x, consts)


def device_parts(mode: str, stats: dict, mesh):
    """(`fn(x, consts)`, consts): the device preprocessing as a traceable function and its
    statistics, replicated on the mesh (arguments, not constants folded into the program).
    x: a batch (B, H, W, C) or K of them stacked (K, B, H, W, C), each preprocessed bitwise as
    alone."""
    import jax

    from nodepert_dist import mesh as mesh_lib

    consts = {
        k: jax.device_put(np.asarray(v, np.float32), mesh_lib.replicated(mesh))
        for k, v in stats.items()
    }

    def matmul(a, w):  # K stacked batches: one product each, as a lone batch's (bitwise)
        return jax.numpy.stack([b @ w for b in a]) if a.ndim == 3 else a @ w

    def exact(x, c):  # zca's matmul in float32 on every backend (a GPU's default is TF32)
        with jax.default_matmul_precision("highest"):
            return apply(x, mode, c, matmul)

    return exact, consts
