"""Small datasets generated in the exact published formats (IDX; CIFAR python pickles), and in
the forms users' copies take (un-gzipped IDX under their common names; pickles re-saved by
Python 3 with any protocol, by numpy 1.x or 2.x).

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
import types

import numpy as np

from nodepert_dist.data import cifar, mnist


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


class _Py3Pickler(pickle._Pickler):
    """Python 3's pickle, writing numpy's globals under the module names of numpy 1.x
    (numpy.core.*) or 2.x (numpy._core.*), whichever numpy runs here."""

    def __init__(self, file, protocol, numpy_major):
        super().__init__(file, protocol)
        self.numpy_major = numpy_major

    def save_global(self, obj, name=None):
        module, name = obj.__module__, name or obj.__qualname__
        if module.startswith(("numpy._core", "numpy.core")):
            module = ("numpy.core" if self.numpy_major == 1 else "numpy._core") + module.split(
                "core", 1
            )[1]
        if module == "builtins" and self.proto < 3:  # Python 3 writes Python 2's name there
            module = "__builtin__"
        if self.proto >= 4:
            self.save(module), self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


def py3_pickle(obj, protocol: int, numpy_major: int = 2) -> bytes:
    """`obj` as Python 3's pickle.dump writes it with numpy 1.x or 2.x."""
    buf = io.BytesIO()
    _Py3Pickler(buf, protocol, numpy_major).dump(obj)
    return buf.getvalue()


# Forms of a re-saved CIFAR batch: (protocol, keys, numpy major version, labels as)
CIFAR_FORMS = {
    "py2": None,  # the published form
    "py3-p0-bytes-keys": (0, bytes, 2, list),
    "py3-p2-bytes-keys-numpy1": (2, bytes, 1, list),
    "py3-p3-str-keys-numpy1": (3, str, 1, "numpy scalars"),
    "py3-p4-str-keys": (4, str, 2, np.ndarray),
    "py3-p5-bytes-keys": (5, bytes, 2, np.ndarray),
    "py3-p5-str-keys-numpy1": (5, str, 1, list),
}


def cifar_pickle(d: dict, form: str) -> bytes:
    """A CIFAR dict (bytes keys, list labels, as published) pickled in one of CIFAR_FORMS."""
    if CIFAR_FORMS[form] is None:
        return py2_pickle(d)
    protocol, keys, numpy_major, labels = CIFAR_FORMS[form]
    as_labels = {
        list: list,
        np.ndarray: lambda v: np.asarray(v, np.int64),
        "numpy scalars": lambda v: [np.int64(x) for x in v],
    }[labels]
    d = {
        (k.decode() if keys is str else k): (
            as_labels(v)
            if k.endswith(b"labels") and isinstance(v, list) and k != b"label_names"
            else v
        )
        for k, v in d.items()
    }
    return py3_pickle(d, protocol, numpy_major)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def idx_name(published: str, spelling: int) -> str:
    """0: the published name (train-images-idx3-ubyte.gz); 1: without .gz; 2: the dotted
    spelling of many unpacked copies (train-images.idx3-ubyte)."""
    stem = published.removesuffix(".gz")
    return (published, stem, stem.replace("-idx", ".idx"))[spelling]


def write_idx_dataset(root, n_train=60, n_test=20, gz=True, seed=1, spelling=0):
    """The four IDX files of a small MNIST; gz=False writes them un-gzipped, under the name
    idx_name(..., spelling)."""
    rng = np.random.default_rng(seed)
    arrays = {
        mnist.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28)),
        mnist.TRAIN_LABELS: rng.integers(0, 10, n_train),
        mnist.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28)),
        mnist.TEST_LABELS: rng.integers(0, 10, n_test),
    }
    os.makedirs(root, exist_ok=True)
    for name, a in arrays.items():
        path = os.path.join(root, idx_name(name, spelling))
        with (gzip.open if gz else open)(path, "wb") as f:
            f.write(idx_bytes(a))
    return arrays


def cifar_members(
    name: str, per_batch: int, n_test: int, seed: int = 0, form: str = "py2"
) -> tuple[dict, dict]:
    """{member: pickled bytes} of a small CIFAR-10/100 in the real format (or re-saved in
    another of CIFAR_FORMS), and the arrays (train/test images N x 32 x 32 x 3, labels, coarse
    labels) it holds."""
    spec, rng = cifar.CIFAR[name], np.random.default_rng(seed)
    members, arrays = {}, {"train_x": [], "train_y": [], "train_c": []}

    def batch(member, n, label):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, spec.num_classes, n)
        d = {
            b"batch_label": f"{label}".encode(),
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar10":
            d[b"labels"] = [int(v) for v in fine]
        else:
            coarse = fine // 5
            d[b"fine_labels"], d[b"coarse_labels"] = (
                [int(v) for v in fine],
                [int(v) for v in coarse],
            )
        members[member] = cifar_pickle(d, form)
        images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, fine, fine // 5

    for i, member in enumerate(spec.train):
        x, y, c = batch(member, per_batch, f"training batch {i + 1} of {len(spec.train)}")
        arrays["train_x"].append(x), arrays["train_y"].append(y), arrays["train_c"].append(c)
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    arrays["test_x"], arrays["test_y"], arrays["test_c"] = batch(
        spec.test[0], n_test, "testing batch 1 of 1"
    )
    meta = (
        {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_vis": 3072,
            b"num_cases_per_batch": per_batch,
        }
        if name == "cifar10"
        else {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        }
    )
    members[spec.meta] = cifar_pickle(meta, form)
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


def fake_cifar(tmp_path, name="cifar10", per_batch=40, n_test=30, seed=0, form="py2"):
    """A tarball and an extracted folder of the same small CIFAR, and its arrays."""
    members, arrays = cifar_members(name, per_batch, n_test, seed, form)
    tarball = write_cifar_tarball(tmp_path / cifar.CIFAR[name].archive, name, members)
    folder = write_cifar_folder(tmp_path / "extracted", name, members)
    return tarball, folder, arrays, members
