"""Grain input pipeline: shuffle per epoch from the seed, batch, shard by process, augment.

The global batch at (epoch, step) is a pure function of (seed, epoch, step): permute the row
numbers of the split with a generator seeded from (seed, epoch), cut them into global batches
(Grain maps batch numbers to batches, with random access and prefetch), and let
process p gather only the contiguous slice [p*b, (p+1)*b) of each one from the memory-mapped
images (store.py), so it reads only its share. Contiguous slices keep every example at the same
position of the global batch whatever the process count, so its noise key is the same too.
Augmentation draws from (seed, epoch, dataset row) (augment.py), never from the position.
The position in an epoch is just the step index: resuming is `batches[step:]`.

Batches leave the pipeline as uint8 images and int32 labels; preprocess.device_fn turns them
into float32 on the device.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING

import numpy as np

from nodepert_dist import settings as settings_lib

if TYPE_CHECKING:
    import grain  # imported where used: ~0.35 s (with orbax) off every command's start-up
from nodepert_dist.data import augment as augment_lib
from nodepert_dist.data import preprocess, store
from nodepert_dist.settings import setting


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The data of a run: dataset, split, preprocessing, augmentation, prefetch; part of
    config.Config (run_setup.build opens them)."""

    dataset: str = setting(
        "mnist",
        "Dataset (fetch it first: python -m nodepert_dist.data fetch NAME).",
        group="data",
        choices=store.DATASETS,
    )
    data_dir: str = setting("data", "Where datasets live.", group="data")
    preprocess: str = setting(
        "auto",
        "auto (per_channel for CIFAR, standardize otherwise), "
        "standardize (train-set mean/std), per_channel, unit ([0, 1]) or "
        "zca (ZCA whitening).",
        group="data",
        choices=preprocess.MODES,
    )
    augment: bool = setting(
        False,
        "Random crop (4-pixel padding) and horizontal flip of "
        "training images, a pure function of (seed, epoch, example).",
        group="data",
    )
    validation_size: int = setting(
        0, "Hold out the last N training examples as a validation split (val_acc).", group="data"
    )
    cifar100_labels: str = setting(
        "fine",
        "CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses).",
        group="data",
        choices=store.LABEL_SETS,
    )
    data_workers: int = setting(
        0,
        "Input prefetch: 0 = threads in each process, N > 0 = N Grain worker processes.",
        group="data",
    )
    data_on_device: bool = setting(
        False,
        "Keep the training split (uint8) on every device and gather each batch inside the "
        "compiled step: the host does one call per step, no batch assembly or transfer (the "
        "same batches and updates as the host pipeline). Costs the split's size per device; "
        "not with --augment. For small datasets on GPUs, where the host is the bottleneck.",
        group="data",
    )

    def validate(self) -> None:
        settings_lib.check_choices(self)
        settings_lib.check_non_negative(self, "validation_size", "data_workers")
        if self.data_on_device and self.augment:
            raise ValueError(
                "--data_on_device gathers stored images on the device and --augment crops and "
                "flips them on the host: drop one of them"
            )


def open_splits(data: DataSettings, batchsize: int):
    """(the dataset, {"train": rows, "val": rows}, steps per epoch) of a run's data settings;
    one line if the split or the batch does not fit the dataset."""
    dataset = store.open_dataset(data.dataset, data.data_dir, data.cifar100_labels)
    n_train = len(dataset.train_y) - data.validation_size
    if n_train <= 0:
        raise ValueError(
            f"--validation_size={data.validation_size} leaves no training examples "
            f"of {len(dataset.train_y)}"
        )
    steps = steps_per_epoch(n_train, batchsize)
    if steps == 0:
        raise ValueError(f"--batchsize={batchsize} is larger than the {n_train} training examples")
    return dataset, {"train": (0, n_train), "val": (n_train, len(dataset.train_y))}, steps


class Rows:
    """A memory-mapped array that pickles as its file name (Grain workers map the file again
    instead of receiving a copy); plain arrays pickle as themselves."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.path = getattr(array, "filename", None)

    def __getstate__(self):
        return {"path": self.path} if self.path else {"array": self.array}

    def __setstate__(self, state):
        self.path = state.get("path")
        self.array = np.load(self.path, mmap_mode="r") if self.path else state["array"]

    def __getitem__(self, index):
        return self.array[index]

    def __len__(self):
        return len(self.array)


# Recorded in checkpoints: resuming mid-epoch needs the same order (train.py checks it).
DATA_ORDER = (
    "rows[lo:hi][numpy PCG64(SeedSequence([seed, epoch])).permutation], cut in global batches"
)


def epoch_order(seed: int, epoch: int, lo: int, hi: int) -> np.ndarray:
    """The epoch's order of rows [lo, hi): one vectorised permutation (~3 ms for 60k rows;
    Grain's per-element index shuffle cost ~1 ms per 128-example batch, the pipeline's
    largest cost)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return lo + rng.permutation(hi - lo)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return num_examples // global_batch


class _Gather:
    """Global batch number -> this process's (uint8 images, int32 labels) slice of it."""

    def __init__(self, images, labels, order, global_batch, offset, local, seed, epoch, augment):
        self.images, self.labels, self.order = Rows(images), Rows(labels), order
        self.global_batch, self.offset, self.local = global_batch, offset, local
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __call__(self, step):
        start = step * self.global_batch + self.offset
        mine = self.order[start : start + self.local]
        x, y = self.images[mine], np.asarray(self.labels[mine], np.int32)
        if self.augment:
            x = augment_lib.crop_flip(x, augment_lib.example_bits(self.seed, self.epoch, mine))
        return np.ascontiguousarray(x), y


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    rows: tuple[int, int] | None = None,
    augment: bool = False,
) -> grain.MapDataset:
    """This process's slice of every global batch of `epoch` over rows [lo, hi) (random access)."""
    lo, hi = rows if rows is not None else (0, len(labels))
    local = global_batch // process_count
    gather = _Gather(
        images,
        labels,
        epoch_order(seed, epoch, lo, hi),
        global_batch,
        process_index * local,
        local,
        seed,
        epoch,
        augment,
    )
    import grain

    return grain.MapDataset.range(steps_per_epoch(hi - lo, global_batch)).map(gather)


class _EvalGather:
    """Eval batch number -> (images, labels, mask): this process's slice, the tail padded."""

    def __init__(self, images, labels, lo, hi, global_batch, offset, local):
        self.images, self.labels = Rows(images), Rows(labels)
        self.lo, self.hi, self.global_batch, self.offset, self.local = (
            lo,
            hi,
            global_batch,
            offset,
            local,
        )

    def __call__(self, batch):
        start = self.lo + batch * self.global_batch + self.offset
        idx = np.arange(start, start + self.local)
        mask = (idx < self.hi).astype(np.float32)
        idx = np.minimum(idx, self.hi - 1)
        return self.images[idx], np.asarray(self.labels[idx], np.int32), mask


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    rows: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """Whole-split evaluation in order: (images, labels, mask) slices, the last batch padded."""
    lo, hi = rows if rows is not None else (0, len(labels))
    local = global_batch // process_count
    n_batches = -(-(hi - lo) // global_batch)
    gather = _EvalGather(images, labels, lo, hi, global_batch, process_index * local, local)
    import grain

    return grain.MapDataset.range(n_batches).map(gather)


# Preemption signals: the run's process handles them (preempt.py) and then closes its workers.
_RUN_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _ignore_run_signals(*_worker) -> None:
    """Grain worker init: a SIGTERM to the run's process group (SLURM, a terminal) must not kill
    a worker mid-batch (the main process would wait for its batch forever); the main process
    stops the workers when it closes the iterator. As the worker ignores SIGTERM, it exits by
    itself if the main process dies (kill -9) without stopping it."""
    for sig in _RUN_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _RUN_SIGNALS)
    threading.Thread(
        target=_exit_without, args=(os.getppid(),), daemon=True, name="exit-with-run"
    ).start()


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:  # re-parented once the main process is gone
        time.sleep(1.0)
    os._exit(1)


def iterate(
    batches: grain.MapDataset, start: int = 0, prefetch: int = 4, workers: int = 0
) -> Iterator:
    """Iterates from batch `start`: `workers` = 0 prefetches with threads in this process;
    > 0 uses that many Grain worker processes (needs absl flags parsed: run under absl.app).

    A generator: close it (or run it to the end) to stop the prefetch threads or workers."""
    import grain

    ds = batches[start:]
    if workers <= 0:
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
        it = iter(ds.to_iter_dataset(options))
        try:
            yield from it
        finally:
            it.close()
        return
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
    # Grain's threads spawn the workers during this call and the first `next`. Threads and
    # spawned processes inherit the signal mask, so the run's signals stay blocked in a worker
    # until `_ignore_run_signals` ignores them: none can kill a worker while it starts up.
    blocked, it = signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS), None
    try:
        # Python's resource tracker, if it starts here, unblocks SIGINT/SIGTERM in the thread
        # that starts it: start it first (it ignores them itself), then block them again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS)
        it = iter(ds.to_iter_dataset().mp_prefetch(options, worker_init_fn=_ignore_run_signals))
        element = next(it, None)
    except BaseException:
        if it is not None:
            it.close()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        while element is not None:
            # A copy out of Grain's shared memory: a batch still referenced at exit (jax may keep
            # a zero-copy view of a host array) would leave its block unfreed, and Python's
            # resource_tracker would print a "leaked shared_memory" warning as the run's last line.
            batch = tuple(np.array(a) for a in element)
            element = None
            yield batch
            element = next(it, None)
    finally:
        it.close()
