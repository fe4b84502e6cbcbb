"""Data: process shards, IDX / pickle readers, damaged files, and the verified fetch."""

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import struct
import threading

import numpy as np
import pytest

from nodepert_dist.data import pipeline, sources
from nodepert_dist.data.sources import DataError

# ----------------------------------------------------------------------------- pipeline


def _epoch(n, global_batch, epoch, p, count, seed=7):
    x = np.arange(n)  # the "images" are their own indices
    return [xb for xb, _ in pipeline.train_batches(x, x, global_batch=global_batch, seed=seed,
                                                   epoch=epoch, process_index=p, process_count=count)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_the_epoch(count):
    n, batch = 1000, 96
    shards = [np.concatenate(_epoch(n, batch, 1, p, count)) for p in range(count)]
    seen = np.concatenate(shards)
    steps = n // batch
    assert len(seen) == steps * batch == len(np.unique(seen))  # disjoint, nothing repeated
    assert all(len(s) == steps * batch // count for s in shards)
    assert set(seen) <= set(range(n)) and n - len(seen) < batch  # only the remainder is dropped


def test_global_batch_is_the_same_for_any_process_count():
    one = _epoch(1000, 96, 3, 0, 1)
    for count in (2, 4):
        per_process = [_epoch(1000, 96, 3, p, count) for p in range(count)]
        for step, batch in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([b[step] for b in per_process]), batch)


def test_each_epoch_has_its_own_order_and_it_is_reproducible():
    a, b = np.concatenate(_epoch(500, 50, 1, 0, 1)), np.concatenate(_epoch(500, 50, 2, 0, 1))
    assert not np.array_equal(a, b) and sorted(a) == sorted(b)
    np.testing.assert_array_equal(a, np.concatenate(_epoch(500, 50, 1, 0, 1)))
    assert not np.array_equal(a, np.concatenate(_epoch(500, 50, 1, 0, 1, seed=8)))


def test_iterating_from_a_step_resumes_the_same_batches():
    x = np.arange(300)
    batches = pipeline.train_batches(x, x, global_batch=30, seed=1, epoch=1)
    full = [b for b, _ in pipeline.iterate(batches)]
    tail = [b for b, _ in pipeline.iterate(batches, start=4)]
    assert len(full) == 10
    for a, b in zip(full[4:], tail, strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_batches_cover_every_example_once():
    x = np.arange(1003)
    seen = []
    for count in (1, 2):
        got = []
        for p in range(count):
            for xb, yb, mask in pipeline.eval_batches(x, x, global_batch=200, process_index=p,
                                                      process_count=count):
                got.extend(xb[mask > 0].tolist())
        seen.append(sorted(got))
    assert seen[0] == seen[1] == list(range(1003))


def test_standardize_uses_training_statistics():
    rng = np.random.default_rng(0)
    arrays = sources.Arrays(rng.uniform(size=(200, 4, 4, 3)).astype(np.float32) * [1, 2, 3],
                            np.zeros(200, np.int32), np.full((10, 4, 4, 3), 0.5, np.float32),
                            np.zeros(10, np.int32), 10)
    out = pipeline.standardize(arrays)
    np.testing.assert_allclose(out.train_x.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.train_x.std(axis=(0, 1, 2)), 1, atol=1e-4)
    mean, std = arrays.train_x.mean(axis=(0, 1, 2)), arrays.train_x.std(axis=(0, 1, 2))
    np.testing.assert_allclose(out.test_x[0, 0, 0], (0.5 - mean) / std, rtol=1e-5)


# ----------------------------------------------------------------------------- readers

def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, gz: bool):
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def _fake_idx_dataset(root, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(1)
    arrays = {
        sources.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28)),
        sources.TRAIN_LABELS: rng.integers(0, 10, n_train),
        sources.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28)),
        sources.TEST_LABELS: rng.integers(0, 10, n_test),
    }
    os.makedirs(root, exist_ok=True)
    for name, a in arrays.items():
        _write(os.path.join(root, name), _idx_bytes(a), gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_round_trip_gzip_and_raw(tmp_path, gz):
    arrays = _fake_idx_dataset(tmp_path / "fmnist", gz=gz)
    data = sources.load("fmnist", str(tmp_path))
    np.testing.assert_array_equal(data.train_y, arrays[sources.TRAIN_LABELS])
    np.testing.assert_allclose(data.test_x[..., 0], arrays[sources.TEST_IMAGES] / 255.0, rtol=1e-6)
    assert data.train_x.shape == (60, 28, 28, 1) and data.train_x.dtype == np.float32


def test_mnist_pickle_reader_joins_train_and_valid(tmp_path):
    rng = np.random.default_rng(2)
    split = lambda n: (rng.uniform(size=(n, 784)).astype(np.float32), rng.integers(0, 10, n))
    train, valid, test = split(50), split(10), split(10)
    os.makedirs(tmp_path / "mnist")
    with gzip.open(tmp_path / "mnist" / sources.MNIST_PICKLE, "wb") as f:
        pickle.dump((train, valid, test), f)
    data = sources.load("mnist", str(tmp_path))
    assert data.train_x.shape == (60, 28, 28, 1) and data.test_x.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(data.train_y, np.concatenate([train[1], valid[1]]))
    np.testing.assert_allclose(data.train_x[50].reshape(-1), valid[0][0])


def test_missing_dataset_names_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(DataError, match=r"missing dataset file .*train-images.*nodepert_dist.data fetch mnist"):
        sources.load("mnist", str(tmp_path))


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    _fake_idx_dataset(tmp_path / "fmnist", gz=False)
    path = tmp_path / "fmnist" / sources.TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"truncated .*{sources.TRAIN_IMAGES}"):
        sources.load("fmnist", str(tmp_path))


def test_corrupt_gzip_file_is_a_clear_error(tmp_path):
    _fake_idx_dataset(tmp_path / "fmnist", gz=True)
    path = tmp_path / "fmnist" / sources.TEST_LABELS
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = b"\x00" * (len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{sources.TEST_LABELS}"):
        sources.load("fmnist", str(tmp_path))


def test_wrong_magic_and_corrupt_pickle_are_clear_errors(tmp_path):
    _fake_idx_dataset(tmp_path / "fmnist", gz=False)
    (tmp_path / "fmnist" / sources.TRAIN_LABELS).write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="bad magic"):
        sources.load("fmnist", str(tmp_path))
    os.makedirs(tmp_path / "mnist")
    (tmp_path / "mnist" / sources.MNIST_PICKLE).write_bytes(gzip.compress(b"garbage"))
    with pytest.raises(DataError, match=f"corrupt dataset file .*{sources.MNIST_PICKLE}"):
        sources.load("mnist", str(tmp_path))


# ----------------------------------------------------------------------------- fetch

class _Server:
    """A loopback HTTP server over a directory, counting requests."""

    def __init__(self, root):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Real-format fmnist files on a loopback mirror, with their SHA-256 pinned in the spec."""
    _fake_idx_dataset(tmp_path / "mirror")
    digests = {f: hashlib.sha256((tmp_path / "mirror" / f).read_bytes()).hexdigest()
               for f in os.listdir(tmp_path / "mirror")}
    monkeypatch.setitem(sources.DATASETS, "fmnist",
                        sources.IdxDataset("fmnist", mirrors=(), sha256=digests))
    server = _Server(tmp_path / "mirror")
    yield server, tmp_path
    server.close()


def test_fetch_downloads_verifies_and_caches(served):
    server, tmp = served
    sources.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert len(sources.load("fmnist", str(tmp / "data")).train_y) == 60
    n = len(server.requests)
    sources.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert len(server.requests) == n == 4  # verified files are not fetched again


def test_fetch_falls_through_to_the_next_mirror(served):
    server, tmp = served
    dead = "http://127.0.0.1:9/"  # nothing listens on the discard port
    sources.fetch("fmnist", str(tmp / "data"), mirrors=[dead, server.url], timeout=5)
    assert len(sources.load("fmnist", str(tmp / "data")).test_y) == 20


def test_fetch_rejects_a_bad_checksum_and_leaves_nothing_behind(served):
    server, tmp = served
    bad = tmp / "mirror" / sources.TRAIN_LABELS
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x07")
    with pytest.raises(DataError, match="SHA-256 .* does not match"):
        sources.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    leftovers = os.listdir(tmp / "data" / "fmnist")
    assert sources.TRAIN_LABELS not in leftovers and not [f for f in leftovers if f.startswith(".part")]


def test_fetch_replaces_a_corrupted_cached_file(served):
    server, tmp = served
    sources.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    cached = tmp / "data" / "fmnist" / sources.TEST_IMAGES
    cached.write_bytes(b"truncated")
    sources.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert len(sources.load("fmnist", str(tmp / "data")).test_y) == 20
