"""Shared test set-up: 8 simulated CPU devices, and where the real MNIST lives.

`.ci/run` fetches MNIST into ./data; set NODEPERT_DATA_DIR to use another place.
"""

import os
import pathlib

from nodepert_dist.mesh import simulate_cpu_devices

import pytest

# Before any backend starts: every in-process test sees 8 CPU devices.
simulate_cpu_devices(8)

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("NODEPERT_DATA_DIR", str(REPO / "data"))


@pytest.fixture(scope="session")
def mnist_dir():
    """The data_dir holding fetched MNIST; fails (never skips) when it is missing."""
    from nodepert_dist.data import DataError, open_dataset
    try:
        open_dataset("mnist", DATA_DIR)  # converts the fetched files once, if not yet done
    except DataError as e:
        pytest.fail(f"{e} (CI fetches it in .ci/run)")
    return DATA_DIR
