"""Grain input pipeline: standardise, shuffle per epoch from the seed, batch, shard by process.

The global batch at (epoch, step) is a pure function of (seed, epoch, step): shuffle all indices
with a seed derived from (seed, epoch), cut into global batches, and let process p gather only the
contiguous slice [p*b, (p+1)*b) of each one. Contiguous slices keep every example at the same
position of the global batch whatever the process count, so its noise key is the same too.
The position in an epoch is just the step index: resuming is `batches[step:]`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from nodepert_dist.data.sources import Arrays


def standardize(arrays: Arrays) -> Arrays:
    """Per-channel standardisation with the training set's mean and std."""
    axes = tuple(range(arrays.train_x.ndim - 1))
    mean = arrays.train_x.mean(axis=axes, dtype=np.float64).astype(np.float32)
    std = arrays.train_x.std(axis=axes, dtype=np.float64).astype(np.float32)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    norm = lambda x: ((x - mean) / std).astype(np.float32)
    return dataclasses.replace(arrays, train_x=norm(arrays.train_x), test_x=norm(arrays.test_x))


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return num_examples // global_batch


def train_batches(x: np.ndarray, y: np.ndarray, *, global_batch: int, seed: int, epoch: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's (images, labels) slice of every global batch of `epoch` (random access)."""
    local = global_batch // process_count
    lo = process_index * local

    def gather(indices):
        mine = indices[lo:lo + local]
        return x[mine], y[mine]

    return (grain.MapDataset.range(len(x))
            .shuffle(seed=epoch_seed(seed, epoch))
            .batch(global_batch, drop_remainder=True)
            .map(gather))


def iterate(batches: grain.MapDataset, start: int = 0, prefetch: int = 4) -> Iterator:
    """Iterates from batch `start` with a small threaded prefetch."""
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
    return iter(batches[start:].to_iter_dataset(options))


def eval_batches(x: np.ndarray, y: np.ndarray, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator:
    """Whole-set evaluation: (images, labels, mask) slices, the last batch padded and masked."""
    local = global_batch // process_count
    n = len(x)
    for start in range(0, n, global_batch):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        yield x[idx], y[idx], mask
