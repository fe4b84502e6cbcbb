"""What every reader returns (`Raw`: a whole dataset as uint8 images) and the data error type."""

from __future__ import annotations

import dataclasses
import os

import numpy as np


class DataError(RuntimeError):
    """A dataset file is missing, truncated or corrupt. The message names the file and the fix."""


@dataclasses.dataclass
class Raw:
    """A dataset in memory as published: images (N, H, W, C) uint8, labels (N,) int32.

    `extra` holds other label sets by name, e.g. CIFAR-100's {"coarse": (train, test)}.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    extra: dict = dataclasses.field(default_factory=dict)


def publish_mode(path: str, directory: bool = False) -> None:
    """Gives a file or folder made by mkstemp/mkdtemp (0600/0700) the umask's usual mode, so
    datasets in a shared data_dir stay readable by other users, as with plain open()."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
