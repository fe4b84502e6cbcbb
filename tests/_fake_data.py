"""Small datasets generated in the exact published formats (IDX; CIFAR python pickles).

CIFAR batches are dicts with bytes keys, pickled as the originals were by Python 2's cPickle
(protocol 2, strings as BINSTRING, numpy arrays via numpy.core.multiarray._reconstruct):
b"batch_label", b"labels" / b"fine_labels" + b"coarse_labels", b"data" (N x 3072 uint8,
channel-major), b"filenames"; plus batches.meta / meta.
"""

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np

from nodepert_dist.data import cifar, sources


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 the way Python 2 wrote it: every str/bytes is a raw BINSTRING (Python 3's own
    protocol 2 would wrap bytes in _codecs.encode, which the real files never contain)."""

    def _save_binstring(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = _save_binstring
    dispatch[str] = _save_binstring


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(root, n_train=60, n_test=20, gz=True, seed=1):
    rng = np.random.default_rng(seed)
    arrays = {
        sources.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28)),
        sources.TRAIN_LABELS: rng.integers(0, 10, n_train),
        sources.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28)),
        sources.TEST_LABELS: rng.integers(0, 10, n_test),
    }
    os.makedirs(root, exist_ok=True)
    for name, a in arrays.items():
        with (gzip.open if gz else open)(os.path.join(root, name), "wb") as f:
            f.write(idx_bytes(a))
    return arrays


def cifar_members(name: str, per_batch: int, n_test: int, seed: int = 0) -> tuple[dict, dict]:
    """{member: pickled bytes} of a small CIFAR-10/100 in the real format, and the arrays
    (train/test images N x 32 x 32 x 3, labels, coarse labels) it holds."""
    spec, rng = cifar.CIFAR[name], np.random.default_rng(seed)
    members, arrays = {}, {"train_x": [], "train_y": [], "train_c": []}

    def batch(member, n, label):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, spec.num_classes, n)
        d = {b"batch_label": f"{label}".encode(), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        if name == "cifar10":
            d[b"labels"] = [int(v) for v in fine]
        else:
            coarse = fine // 5
            d[b"fine_labels"], d[b"coarse_labels"] = [int(v) for v in fine], [int(v) for v in coarse]
        members[member] = py2_pickle(d)
        images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, fine, fine // 5

    for i, member in enumerate(spec.train):
        x, y, c = batch(member, per_batch, f"training batch {i + 1} of {len(spec.train)}")
        arrays["train_x"].append(x), arrays["train_y"].append(y), arrays["train_c"].append(c)
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    arrays["test_x"], arrays["test_y"], arrays["test_c"] = batch(spec.test[0], n_test, "testing batch 1 of 1")
    meta = ({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072,
             b"num_cases_per_batch": per_batch} if name == "cifar10" else
            {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
             b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    members[spec.meta] = py2_pickle(meta)
    return members, arrays


def write_cifar_folder(parent, name, members) -> str:
    folder = os.path.join(parent, cifar.CIFAR[name].folder)
    os.makedirs(folder, exist_ok=True)
    for member, data in members.items():
        with open(os.path.join(folder, member), "wb") as f:
            f.write(data)
    return folder


def write_cifar_tarball(path, name, members, skip=()) -> str:
    folder = cifar.CIFAR[name].folder
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            if member in skip:
                continue
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def fake_cifar(tmp_path, name="cifar10", per_batch=40, n_test=30, seed=0):
    """A tarball and an extracted folder of the same small CIFAR, and its arrays."""
    members, arrays = cifar_members(name, per_batch, n_test, seed)
    tarball = write_cifar_tarball(tmp_path / cifar.CIFAR[name].archive, name, members)
    folder = write_cifar_folder(tmp_path / "extracted", name, members)
    return tarball, folder, arrays, members
