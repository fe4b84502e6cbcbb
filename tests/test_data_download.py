"""Downloads against a loopback HTTP server serving generated files in the real formats: success,
checksum mismatch, server error, interrupted transfer, and the mirror fall-through."""

import dataclasses
import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
from _fake_data import fake_cifar, write_idx_dataset

from nodepert_dist.data import cifar, fetch, mnist, store
from nodepert_dist.data.raw import DataError


class _Server:
    """A loopback HTTP server over a directory, counting requests. `mode`: "ok"; "error" (HTTP
    500 for everything); "cut" (announces the full length, sends half, closes)."""

    def __init__(self, root):
        self.requests, self.mode = [], "ok"
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                outer.requests.append(self.path)

            def do_GET(self):
                if outer.mode == "error":
                    self.send_error(500, "internal error")
                elif outer.mode == "cut":
                    data = open(os.path.join(str(root), self.path.lstrip("/")), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    outer.requests.append(self.path)
                else:
                    super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cifar_mirror(tmp_path, monkeypatch):
    """A generated cifar-10-python.tar.gz on a loopback mirror, its checksums pinned in the spec."""
    os.makedirs(tmp_path / "mirror")
    tarball, _, arrays, _ = fake_cifar(tmp_path / "mirror")
    blob = open(tarball, "rb").read()
    spec = dataclasses.replace(
        cifar.CIFAR["cifar10"],
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        md5=hashlib.md5(blob).hexdigest(),
    )
    monkeypatch.setitem(cifar.CIFAR, "cifar10", spec)
    server = _Server(tmp_path / "mirror")
    yield server, tmp_path, arrays
    server.close()


def _leftovers(path):
    return [p.name for p in path.rglob("*")] if path.exists() else []


def test_download_verifies_converts_and_caches(cifar_mirror):
    server, tmp, arrays = cifar_mirror
    fetch.fetch("cifar10", str(tmp / "data"), mirrors=[server.url])
    data = store.open_dataset("cifar10", str(tmp / "data"))
    assert data.meta["verified"] is True
    np.testing.assert_array_equal(data.train_x, arrays["train_x"])
    n = len(server.requests)
    fetch.fetch("cifar10", str(tmp / "data"), mirrors=[server.url])
    assert n == len(server.requests) == 1  # the verified tarball is not downloaded again


def test_checksum_mismatch_leaves_nothing(cifar_mirror, monkeypatch):
    server, tmp, _ = cifar_mirror
    monkeypatch.setitem(
        cifar.CIFAR, "cifar10", dataclasses.replace(cifar.CIFAR["cifar10"], sha256="0" * 64)
    )
    with pytest.raises(
        DataError, match="cifar-10-python.tar.gz: SHA-256 .* does not match the pinned 0000"
    ):
        fetch.fetch("cifar10", str(tmp / "data"), mirrors=[server.url])
    assert _leftovers(tmp / "data") == []


@pytest.mark.parametrize(
    "mode, message", [("error", "HTTP Error 500"), ("cut", "IncompleteRead|transfer interrupted")]
)
def test_server_error_and_interrupted_transfer_leave_nothing(cifar_mirror, mode, message):
    server, tmp, _ = cifar_mirror
    server.mode = mode
    with pytest.raises(DataError, match=message):
        fetch.fetch("cifar10", str(tmp / "data"), mirrors=[server.url], timeout=10)
    assert _leftovers(tmp / "data") == []
    # An existing data_dir keeps what it had and gains nothing.
    (tmp / "data").mkdir()
    (tmp / "data" / "keep.txt").write_text("x")
    with pytest.raises(DataError):
        fetch.fetch("cifar10", str(tmp / "data"), mirrors=[server.url], timeout=10)
    assert _leftovers(tmp / "data") == ["keep.txt"]


def test_the_next_mirror_is_tried(cifar_mirror):
    server, tmp, _ = cifar_mirror
    dead = "http://127.0.0.1:9/"  # nothing listens on the discard port
    fetch.fetch("cifar10", str(tmp / "data"), mirrors=[dead, server.url], timeout=5)
    assert store.open_dataset("cifar10", str(tmp / "data")).meta["verified"] is True


@pytest.fixture
def idx_mirror(tmp_path, monkeypatch):
    """Real-format fmnist IDX files on a loopback mirror, with their SHA-256 pinned in the spec."""
    write_idx_dataset(tmp_path / "mirror")
    digests = {
        f: hashlib.sha256((tmp_path / "mirror" / f).read_bytes()).hexdigest()
        for f in os.listdir(tmp_path / "mirror")
    }
    monkeypatch.setitem(
        mnist.DATASETS, "fmnist", mnist.IdxDataset("fmnist", mirrors=(), sha256=digests)
    )
    server = _Server(tmp_path / "mirror")
    yield server, tmp_path
    server.close()


def test_idx_fetch_downloads_verifies_and_caches(idx_mirror):
    server, tmp = idx_mirror
    fetch.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    data = store.open_dataset("fmnist", str(tmp / "data"))
    assert len(data.train_y) == 60 and data.meta["verified"] is True
    fetch.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert len(server.requests) == 4  # verified files are not fetched again


def test_idx_fetch_rejects_a_bad_checksum_and_leaves_nothing(idx_mirror):
    server, tmp = idx_mirror
    bad = tmp / "mirror" / mnist.TRAIN_LABELS
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x07")
    with pytest.raises(DataError, match="SHA-256 .* does not match"):
        fetch.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert _leftovers(tmp / "data") == []


def test_idx_fetch_replaces_a_corrupted_cached_file(idx_mirror):
    server, tmp = idx_mirror
    fetch.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    (tmp / "data" / "fmnist" / mnist.TEST_IMAGES).write_bytes(b"truncated")
    fetch.fetch("fmnist", str(tmp / "data"), mirrors=[server.url])
    assert len(mnist.read("fmnist", str(tmp / "data" / "fmnist")).test_y) == 20
