"""The converted form every run reads: one folder of memory-mapped `.npy` arrays per dataset.

`<data_dir>/<name>/arrays/` holds `train_images.npy` (N, H, W, C) uint8, `train_labels.npy`
(N,) int32, the same for `test_`, CIFAR-100's `*_coarse_labels.npy`, `meta.json` (shapes,
classes, where it came from, whether its checksums were verified) and `stats/` (cached
preprocessing statistics). A process maps the files and touches only the rows it gathers, so no
process loads the whole set. The folder is written under a temporary name and renamed whole:
a folder named `arrays` is complete (WORKSPACE.md defends .npy over ArrayRecord).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile

import numpy as np
from absl import logging

from nodepert_dist import files
from nodepert_dist.data import cifar, mnist
from nodepert_dist.data.raw import DataError, Raw, publish_mode

ARRAYS = "arrays"
FORMAT = 1
DATASETS = tuple(mnist.DATASETS) + tuple(cifar.CIFAR)
LABEL_SETS = ("fine", "coarse")


def store_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, name, ARRAYS)


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def convert(
    name: str,
    source: str,
    data_dir: str,
    allow_unverified: bool = False,
    replace: bool = True,
    trust_hint: str = "pass --allow_unverified",
) -> str:
    """Reads the published files at `source` and writes `<data_dir>/<name>/arrays/`.

    `source`: the MNIST-family folder of IDX files / mnist.pkl.gz, or a CIFAR tarball or its
    extracted folder. Files that fail the pinned checksums are refused unless `allow_unverified`
    (then a warning, and `"verified": false` in meta.json). replace=False keeps a store that
    another process finished first. `trust_hint`: how the caller accepts an unverified copy.
    """
    check_name(name)
    if name in cifar.CIFAR:
        spec = cifar.CIFAR[name]
        problem = cifar.checksum_problem(source, spec)
    else:
        if not mnist.has_files(name, source):
            raise DataError(mnist.missing(name, source))
        problem = mnist.checksum_problem(name, source)
    if problem and not allow_unverified:
        raise DataError(f"{problem}; if you trust this copy, {trust_hint}")
    if problem:
        logging.warning(
            "%s: UNVERIFIED copy, used because of --allow_unverified: %s", name, problem
        )
    raw = cifar.read(source, cifar.CIFAR[name]) if name in cifar.CIFAR else mnist.read(name, source)
    meta = {
        "format": FORMAT,
        "dataset": name,
        "source": os.path.abspath(source),
        "verified": problem is None,
        "checksum_problem": problem,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write(raw, store_dir(data_dir, name), meta, replace=replace)


def _arrays(raw: Raw) -> dict:
    out = {
        "train_images": raw.train_x,
        "train_labels": raw.train_y,
        "test_images": raw.test_x,
        "test_labels": raw.test_y,
    }
    for kind, (train, test) in raw.extra.items():
        out[f"train_{kind}_labels"], out[f"test_{kind}_labels"] = train, test
    return out


def write(raw: Raw, dest: str, meta: dict, replace: bool = True) -> str:
    """Writes the arrays and meta.json into a temporary folder, then renames it to `dest`."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{ARRAYS}-")
    old = None
    try:
        publish_mode(tmp, directory=True)
        arrays = _arrays(raw)
        for key, array in arrays.items():
            dtype = np.uint8 if key.endswith("images") else np.int32
            np.save(os.path.join(tmp, key + ".npy"), np.ascontiguousarray(array, dtype=dtype))
        meta = dict(
            meta,
            num_classes=raw.num_classes,
            num_classes_extra={"coarse": cifar.NUM_COARSE} if "coarse" in raw.extra else {},
            shapes={k: list(v.shape) for k, v in arrays.items()},
        )
        files.write_json(
            os.path.join(tmp, "meta.json"), meta, indent=2
        )  # the folder is renamed whole
        if os.path.exists(dest):
            if not replace:
                return dest  # another process converted it first
            old = tempfile.mkdtemp(dir=parent, prefix=f".old-{ARRAYS}-")
            os.replace(dest, os.path.join(old, ARRAYS))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
            # another process renamed its (identical) conversion into place first
    finally:
        for path in (tmp, old):
            if path and os.path.exists(path):
                shutil.rmtree(path, ignore_errors=True)
    return dest


@dataclasses.dataclass
class Stored:
    """A converted dataset, memory-mapped: nothing is read until rows are indexed."""

    root: str
    meta: dict
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def _load(root: str, key: str, shape) -> np.ndarray:
    path = os.path.join(root, key + ".npy")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(
            f"corrupt converted file {path} ({e}); delete {root} and fetch again"
        ) from None
    if list(array.shape) != list(shape):
        raise DataError(
            f"{path} has shape {array.shape}, meta.json says {tuple(shape)}; "
            f"delete {root} and fetch again"
        )
    return array


def open_dataset(name: str, data_dir: str, labels: str = "fine") -> Stored:
    """Maps `<data_dir>/<name>/arrays/`, converting verified MNIST-family files on first use."""
    check_name(name)
    if labels not in LABEL_SETS:
        raise ValueError(f"--cifar100_labels={labels!r} is not one of {', '.join(LABEL_SETS)}")
    if labels != "fine" and name != "cifar100":
        raise ValueError(f"--cifar100_labels={labels} applies to --dataset=cifar100 only")
    root, raw_root = store_dir(data_dir, name), os.path.join(data_dir, name)
    if not os.path.exists(os.path.join(root, "meta.json")):
        if name in mnist.DATASETS and mnist.has_files(name, raw_root):
            logging.info("%s: converting %s once into %s", name, raw_root, root)
            convert(
                name,
                raw_root,
                data_dir,
                replace=False,
                trust_hint=(
                    f"run: python -m nodepert_dist.data fetch {name} --from={raw_root} "
                    f"--allow_unverified --data_dir={data_dir}"
                ),
            )
        else:
            raise DataError(
                f"missing dataset {root}; run: python -m nodepert_dist.data fetch {name} "
                f"--data_dir={data_dir}"
            )
    try:
        meta = files.read_json(os.path.join(root, "meta.json"))
        shapes = meta["shapes"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"corrupt {root}/meta.json ({e}); delete {root} and fetch again") from None
    suffix = "labels" if labels == "fine" else f"{labels}_labels"
    keys = ("train_images", f"train_{suffix}", "test_images", f"test_{suffix}")
    tx, ty, sx, sy = (_load(root, k, shapes[k]) for k in keys)
    classes = meta["num_classes"] if labels == "fine" else meta["num_classes_extra"][labels]
    if not meta.get("verified", False):
        logging.warning(
            "%s: %s holds an UNVERIFIED copy (%s)", name, root, meta.get("checksum_problem")
        )
    return Stored(root, meta, tx, ty, sx, sy, int(classes))
