"""Two processes (jax.distributed on localhost, via launch/local.py) read disjoint shards of a
converted dataset that together cover the epoch, and assemble the same global batches (with and
without augmentation) as one process does."""

import sys

import numpy as np
import pytest
from conftest import REPO, run_command

from nodepert_dist.data import pipeline, store
from nodepert_dist.data.raw import Raw

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 200-row CIFAR-shaped store whose labels are the row numbers (num_classes 200)."""
    root = tmp_path_factory.mktemp("mp")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    rows = np.arange(200, dtype=np.int32)
    store.write(
        Raw(x, rows, x[:10], rows[:10], 200),
        store.store_dir(str(root), "cifar10"),
        {"dataset": "cifar10", "verified": False, "checksum_problem": "generated"},
    )
    return str(root)


@pytest.mark.parametrize("augment", [False, True])
def test_two_processes_read_disjoint_shards_that_cover_the_epoch(data_dir, tmp_path, augment):
    out = run_command(
        [
            sys.executable,
            str(REPO / "launch" / "local.py"),
            "--num_processes=2",
            "--devices_per_process=2",
            "--timeout_s=100",
            "--",
            sys.executable,
            str(REPO / "tests" / "_data_worker.py"),
            data_dir,
            str(tmp_path),
            str(int(augment)),
        ],
        timeout=130,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{i}.npz") for i in range(2))
    steps = 180 // 40
    assert r0["rows"].shape == r1["rows"].shape == (steps, 20)
    seen = np.concatenate([r0["rows"].ravel(), r1["rows"].ravel()])
    assert len(np.unique(seen)) == len(seen) == steps * 40  # disjoint
    assert seen.max() < 180  # only the training rows [0, 180)
    data = store.open_dataset("cifar10", data_dir)
    one = list(
        pipeline.iterate(
            pipeline.train_batches(
                data.train_x,
                data.train_y,
                global_batch=40,
                seed=5,
                epoch=2,
                rows=(0, 180),
                augment=augment,
            )
        )
    )
    assert sorted(seen) == sorted(np.concatenate([y for _, y in one]))  # together: the epoch
    for step, (x, y) in enumerate(one):
        for r in (r0, r1):  # both processes see the global batch one process would see
            np.testing.assert_array_equal(r["y"][step], y)
            np.testing.assert_array_equal(r["x"][step], x)
        np.testing.assert_array_equal(np.concatenate([r0["rows"][step], r1["rows"][step]]), y)
