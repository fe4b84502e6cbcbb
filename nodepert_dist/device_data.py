"""--data_on_device: the training split on every device, each batch gathered inside the loop's call.

Measured on an NVIDIA H200 (docs/results/gpu_h200.md): the host pipeline costs ~1.3 ms a step
(Grain's gather and prefetch, one transfer per batch) against 0.09 ms of GPU time for fc at
batch 128, so the trainer ran 14x slower than its compiled step. With the split on the device
(MNIST: 47 MB of uint8, CIFAR-10: 150 MB, per device) the host's work per step is one call:
the epoch's order goes to the devices once, as a (steps, batch) int32 matrix sharded like the
batches, and the call gathers rows `order[i]` (or `order[i:i+K]`) of the resident arrays. The
order is pipeline.epoch_order's and the rows are the same uint8 values, so every batch, and so
every update, is bit for bit the host pipeline's (tests/test_device_data.py). Augmentation runs
on the host (data/augment.py): it is refused with this setting.
"""

from __future__ import annotations

from concurrent import futures

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nodepert_dist.data import pipeline
from nodepert_dist.mesh import DATA


def _put(array: np.ndarray, sharding) -> jax.Array:
    """`array` (the same on every process) laid out as `sharding` says, on any process count."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class DeviceData:
    """The training arrays, replicated on every device of `mesh`."""

    def __init__(self, mesh, images, labels):
        self.mesh = mesh
        replicated = NamedSharding(mesh, P())
        self.images = _put(np.asarray(images), replicated)  # uint8, as the pipeline yields
        self.labels = _put(np.asarray(labels, np.int32), replicated)
        self._ahead = None  # (key, future) of the next epoch's order

    def epoch_order(
        self, *, seed: int, epoch: int, rows: tuple[int, int], global_batch: int, ahead=True
    ):
        """The epoch's batches as row indices, (steps, global_batch) int32, column-sharded over
        `data` as a batch is (each device holds its examples' indices). `ahead`: the next
        epoch's is then made on a thread while this epoch's calls run: made between epochs it
        costs 1.5-3 ms of host time (the permutation and the transfer) that the device waits
        for, 10-20% of an fc MNIST epoch of 16-step calls on an H200 (0.016 s)."""
        key = (seed, epoch, tuple(rows), global_batch)
        made, self._ahead = self._ahead, None
        order = made[1].result() if made and made[0] == key else self._order(*key)
        if not ahead:
            return order
        nxt = (seed, epoch + 1, tuple(rows), global_batch)
        thread = futures.ThreadPoolExecutor(1, "next_epoch_order")
        self._ahead = (nxt, thread.submit(self._order, *nxt))
        thread.shutdown(wait=False)  # its thread ends once the order is made
        return order

    def _order(self, seed: int, epoch: int, rows: tuple[int, int], global_batch: int):
        lo, hi = rows
        steps = pipeline.steps_per_epoch(hi - lo, global_batch)
        order = pipeline.epoch_order(seed, epoch, lo, hi)[: steps * global_batch]
        order = order.reshape(steps, global_batch).astype(np.int32)
        return _put(order, NamedSharding(self.mesh, P(None, DATA)))


def gather(mesh, images, labels, order, i, k: int):
    """Inside the call: batch `i` of `order` ((B, ...) uint8, (B,) labels), or batches
    i..i+k-1 stacked ((k, B, ...)), sharded as the host pipeline's batches are."""
    if k == 1:
        idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
    else:
        idx = jax.lax.dynamic_slice_in_dim(order, i, k)
    sharding = NamedSharding(mesh, P(DATA) if k == 1 else P(None, DATA))
    return tuple(jax.lax.with_sharding_constraint(a[idx], sharding) for a in (images, labels))
