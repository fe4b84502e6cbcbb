"""CIFAR-10 / CIFAR-100 readers: the python-pickle tarballs or their extracted folders.

The published archives (https://www.cs.toronto.edu/~kriz/cifar.html) hold pickled dicts
(`data`: N x 3072 uint8 in channel-major order, `labels` or `fine_labels`/`coarse_labels`),
written by Python 2; copies re-saved by Python 3 have str or bytes keys, any protocol, numpy 1
or 2 arrays, labels as lists or arrays, and all read the same. Only the batches training uses
are read (not `batches.meta` / `meta`: label names). A tarball is checked against its pinned
size, SHA-256 and MD5; an extracted folder against the published MD5 of every batch (the values
torchvision pins). Unpickling goes through `safe_pickle`, so a hostile file cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile

import numpy as np

from nodepert_dist.data import safe_pickle
from nodepert_dist.data.raw import DataError, Raw


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str  # the published tarball's file name
    size: int
    sha256: str
    md5: str
    folder: str  # the folder inside the tarball
    train: tuple  # member names, in order
    test: tuple
    meta: str  # label names: published, never needed
    member_md5: dict  # batch member -> published MD5
    label_key: str
    num_classes: int
    url: str


CIFAR = {
    "cifar10": CifarSpec(
        "cifar10",
        "cifar-10-python.tar.gz",
        170_498_071,
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        member_md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": CifarSpec(
        "cifar100",
        "cifar-100-python.tar.gz",
        169_001_437,
        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        member_md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        },
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}
COARSE_KEY, NUM_COARSE = "coarse_labels", 20


def _unpickle(data: bytes, where: str) -> dict:
    obj = safe_pickle.loads(data, where, "CIFAR file")
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return safe_pickle.str_keys(obj)


def _batch(obj: dict, where: str, spec: CifarSpec):
    """(images N x 32 x 32 x 3 uint8, labels, coarse labels or None) from one unpickled batch."""
    missing = [k for k in ("data", spec.label_key) if k not in obj]
    if missing:
        raise DataError(f"{where} has no {missing[0]!r} entry: not a {spec.name} batch")
    data = np.asarray(obj["data"])
    labels = np.asarray(obj[spec.label_key])
    if labels.dtype.kind not in "iu" and len(labels):  # lists of ints, int arrays of any width
        raise DataError(
            f"{where}: {spec.label_key!r} holds {labels.dtype} values; expected "
            f"integer class labels"
        )
    labels = labels.astype(np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(data) != len(labels)
    ):
        raise DataError(
            f"{where}: data of shape {data.shape} ({data.dtype}) with {len(labels)} "
            f"labels; expected N x 3072 uint8 and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{where}: labels outside [0, {spec.num_classes})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    coarse = np.asarray(obj[COARSE_KEY], np.int64) if COARSE_KEY in obj else None
    return images, labels, coarse


class _Members:
    """Reads the members of a tarball or of an extracted folder by name."""

    def __init__(self, path: str, spec: CifarSpec):
        self.path, self.spec = path, spec
        self.tar = None
        if os.path.isdir(path):
            inner = os.path.join(path, spec.folder)
            self.root = inner if os.path.isdir(inner) else path
        elif os.path.isfile(path):
            try:
                self.tar = tarfile.open(path, "r:*")
                self.names = set(self.tar.getnames())
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(
                    f"{path} is not a readable tarball ({e}); fetch or copy it again"
                ) from None
        else:
            raise DataError(
                f"{path} does not exist; pass the {spec.archive} tarball or its "
                f"extracted {spec.folder}/ folder"
            )

    def where(self, member: str) -> str:
        if self.tar is None:
            return os.path.join(self.root, member)
        return f"{self.path}:{self.spec.folder}/{member}"

    def read(self, member: str) -> bytes:
        if self.tar is None:
            path = self.where(member)
            if not os.path.isfile(path):
                raise DataError(
                    f"missing CIFAR file {path}; the {self.spec.folder}/ folder is incomplete"
                )
            with open(path, "rb") as f:
                return f.read()
        name = f"{self.spec.folder}/{member}"
        if name not in self.names:
            raise DataError(f"{self.path} has no member {name}: not a complete {self.spec.archive}")
        try:
            return self.tar.extractfile(name).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"truncated or corrupt tarball {self.path} at {name} ({e}); fetch or copy it again"
            ) from None

    def close(self):
        if self.tar is not None:
            self.tar.close()


def checksum_problem(path: str, spec: CifarSpec):
    """None if `path` matches the published checksums, else a one-line reason naming the file."""
    if os.path.isfile(path):
        sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk), md5.update(chunk)
                size += len(chunk)
        if size != spec.size or sha.hexdigest() != spec.sha256 or md5.hexdigest() != spec.md5:
            return (
                f"{path} ({size} bytes, SHA-256 {sha.hexdigest()}) does not match the published "
                f"{spec.archive} ({spec.size} bytes, SHA-256 {spec.sha256})"
            )
        return None
    members = _Members(path, spec)
    for member, digest in spec.member_md5.items():
        got = hashlib.md5(members.read(member)).hexdigest()
        if got != digest:
            return f"{members.where(member)} (MD5 {got}) does not match the published MD5 {digest}"
    return None


def read(path: str, spec: CifarSpec) -> Raw:
    """The whole dataset from a tarball or folder; DataError naming the file if it is damaged."""
    members = _Members(path, spec)
    try:
        splits = {}
        for split, names in (("train", spec.train), ("test", spec.test)):
            parts = [
                _batch(_unpickle(members.read(m), members.where(m)), members.where(m), spec)
                for m in names
            ]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
            coarse = (
                None
                if any(p[2] is None for p in parts)
                else np.concatenate([p[2] for p in parts]).astype(np.int32)
            )
            splits[split] = (images, labels, coarse)
    finally:
        members.close()
    extra = {}
    if spec.name == "cifar100":
        if splits["train"][2] is None or splits["test"][2] is None:
            raise DataError(f"{path}: CIFAR-100 batches without {COARSE_KEY!r}")
        extra = {"coarse": (splits["train"][2], splits["test"][2])}
    return Raw(
        splits["train"][0],
        splits["train"][1],
        splits["test"][0],
        splits["test"][1],
        spec.num_classes,
        extra,
    )
