"""Published files -> converted store: IDX / pickle / CIFAR readers, damaged files, checksums,
--from imports and the `fetch` CLI. Every dataset here is generated in the real format."""

import gzip
import json
import os
import pickle
import sys

import numpy as np
import pytest
from _fake_data import (
    CIFAR_FORMS,
    fake_cifar,
    idx_name,
    py2_pickle,
    py3_pickle,
    write_cifar_tarball,
    write_idx_dataset,
)
from conftest import run_command

from nodepert_dist.data import cifar, fetch, mnist, store
from nodepert_dist.data.raw import DataError


def _no_trace(tmp_path, name):
    """Nothing under data_dir that a later run would trust, not even an empty folder."""
    assert not (tmp_path / "data" / name).exists()
    leftovers = [p for p in (tmp_path / "data").rglob("*")] if (tmp_path / "data").exists() else []
    assert leftovers == [], leftovers


# ----------------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_round_trip_gzip_and_raw(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path / "fmnist", gz=gz)
    data = mnist.read("fmnist", str(tmp_path / "fmnist"))
    np.testing.assert_array_equal(data.train_y, arrays[mnist.TRAIN_LABELS])
    np.testing.assert_array_equal(data.test_x[..., 0], arrays[mnist.TEST_IMAGES])
    assert data.train_x.shape == (60, 28, 28, 1) and data.train_x.dtype == np.uint8


MNIST_PICKLE_FORMS = {  # file name, bytes of the pickled splits
    "published": (mnist.MNIST_PICKLE, lambda o: gzip.compress(py2_pickle(o))),
    "py3-p2-numpy1": (mnist.MNIST_PICKLE, lambda o: gzip.compress(py3_pickle(o, 2, 1))),
    "py3-p5-numpy2": (mnist.MNIST_PICKLE, lambda o: gzip.compress(pickle.dumps(o, protocol=5))),
    "un-gzipped": ("mnist.pkl", lambda o: py3_pickle(o, 4, 1)),
}


@pytest.mark.parametrize("form", MNIST_PICKLE_FORMS)
def test_mnist_pickle_reader_joins_train_and_valid_without_loss(tmp_path, form):
    rng = np.random.default_rng(2)
    split = lambda n: (
        rng.integers(0, 256, (n, 784)).astype(np.float32) / 256,
        rng.integers(0, 10, n),
    )
    train, valid, test = split(50), split(10), split(10)
    os.makedirs(tmp_path / "mnist")
    fname, dump = MNIST_PICKLE_FORMS[form]
    (tmp_path / "mnist" / fname).write_bytes(dump((train, valid, test)))
    data = mnist.read("mnist", str(tmp_path / "mnist"))
    assert data.train_x.shape == (60, 28, 28, 1) and data.test_x.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(data.train_y, np.concatenate([train[1], valid[1]]))
    np.testing.assert_array_equal(data.train_x[50].reshape(-1) / 256, valid[0][0])  # exact


def test_damaged_idx_files_are_clear_errors(tmp_path):
    write_idx_dataset(tmp_path / "fmnist", gz=False)
    path = tmp_path / "fmnist" / mnist.TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"truncated .*{mnist.TRAIN_IMAGES}"):
        mnist.read("fmnist", str(tmp_path / "fmnist"))
    (tmp_path / "fmnist" / mnist.TRAIN_LABELS).write_bytes(b"<html>not found</html>")
    write_idx_dataset(tmp_path / "f2", gz=False)
    (tmp_path / "f2" / mnist.TRAIN_LABELS).write_bytes(b"<html>not found</html>")
    with pytest.raises(
        DataError, match=f"{mnist.TRAIN_LABELS} is not an unsigned-byte IDX file .bad magic"
    ):
        mnist.read("fmnist", str(tmp_path / "f2"))
    write_idx_dataset(tmp_path / "f3", gz=True)
    gz = tmp_path / "f3" / mnist.TEST_LABELS
    data = bytearray(gz.read_bytes())
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)
    gz.write_bytes(bytes(data))
    with pytest.raises(DataError, match=mnist.TEST_LABELS):
        mnist.read("fmnist", str(tmp_path / "f3"))


def test_corrupt_mnist_pickle_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "mnist")
    (tmp_path / "mnist" / mnist.MNIST_PICKLE).write_bytes(gzip.compress(b"garbage"))
    with pytest.raises(DataError, match=f"corrupt dataset file .*{mnist.MNIST_PICKLE}"):
        mnist.read("mnist", str(tmp_path / "mnist"))


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
@pytest.mark.parametrize("spelling", [1, 2])  # train-images-idx3-ubyte, train-images.idx3-ubyte
def test_un_gzipped_idx_copies_under_their_common_names_import_as_unverified(
    tmp_path, name, spelling
):
    arrays = write_idx_dataset(tmp_path / "src", gz=False, spelling=spelling)
    src, data_dir = str(tmp_path / "src"), str(tmp_path / "data")
    raw_name = idx_name(mnist.TRAIN_IMAGES, spelling)
    with pytest.raises(
        DataError,
        match=f"{raw_name} is un-gzipped, and only the published "
        f"{mnist.TRAIN_IMAGES} has a pinned SHA-256 .*; if you "
        f"trust this copy, pass --allow_unverified",
    ):
        fetch.fetch(name, data_dir, from_path=src)
    _no_trace(tmp_path, name)
    fetch.fetch(name, data_dir, from_path=src, allow_unverified=True)
    data = store.open_dataset(name, data_dir)
    assert data.meta["verified"] is False and raw_name in data.meta["checksum_problem"]
    np.testing.assert_array_equal(data.train_x[..., 0], arrays[mnist.TRAIN_IMAGES])
    np.testing.assert_array_equal(data.test_y, arrays[mnist.TEST_LABELS])


def test_an_incomplete_from_folder_names_the_file_and_the_users_data_dir(tmp_path):
    write_idx_dataset(tmp_path / "src", gz=False, spelling=2)
    os.remove(tmp_path / "src" / idx_name(mnist.TRAIN_LABELS, 2))
    data_dir = tmp_path / "my data"
    with pytest.raises(DataError) as e:
        fetch.fetch("mnist", str(data_dir), from_path=str(tmp_path / "src"), allow_unverified=True)
    assert str(e.value) == (
        f"{tmp_path / 'src'} has no train-labels-idx1-ubyte.gz / train-labels-idx1-ubyte / "
        f"train-labels.idx1-ubyte / train-labels.idx1-ubyte.gz, nor mnist.pkl.gz / mnist.pkl; "
        f"copy the missing file there, or download: python -m nodepert_dist.data fetch mnist "
        f"--data_dir={data_dir}"
    )
    assert not data_dir.exists()


def test_unverified_files_in_the_data_dir_hint_the_command_that_accepts_them(tmp_path):
    write_idx_dataset(tmp_path / "data" / "fmnist", gz=False, spelling=1)
    with pytest.raises(
        DataError,
        match=(
            f"; if you trust this copy, run: python -m nodepert_dist.data fetch fmnist "
            f"--from={tmp_path / 'data' / 'fmnist'} --allow_unverified --data_dir={tmp_path / 'data'}$"
        ),
    ):
        store.open_dataset("fmnist", str(tmp_path / "data"))
    assert not (tmp_path / "data" / "fmnist" / store.ARRAYS).exists()


def test_a_hostile_mnist_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    os.makedirs(tmp_path / "src")
    (tmp_path / "src" / mnist.MNIST_PICKLE).write_bytes(
        gzip.compress(pickle.dumps(Evil(), protocol=2))
    )
    with pytest.raises(
        DataError,
        match=f"{mnist.MNIST_PICKLE}: refused to unpickle {os.name}.system "
        f"\\(a dataset file may hold only numpy arrays",
    ) as e:
        fetch.fetch(
            "mnist", str(tmp_path / "data"), from_path=str(tmp_path / "src"), allow_unverified=True
        )
    assert "corrupt" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    _no_trace(tmp_path, "mnist")


def test_unverified_idx_files_are_converted_only_when_allowed(tmp_path):
    arrays = write_idx_dataset(tmp_path / "src")
    with pytest.raises(
        DataError,
        match=f"{mnist.TRAIN_IMAGES} .* does not match the pinned SHA-256 .*--allow_unverified",
    ):
        fetch.fetch("fmnist", str(tmp_path / "data"), from_path=str(tmp_path / "src"))
    _no_trace(tmp_path, "fmnist")
    fetch.fetch(
        "fmnist", str(tmp_path / "data"), from_path=str(tmp_path / "src"), allow_unverified=True
    )
    data = store.open_dataset("fmnist", str(tmp_path / "data"))
    assert data.meta["verified"] is False and isinstance(data.train_x, np.memmap)
    np.testing.assert_array_equal(data.train_x[..., 0], arrays[mnist.TRAIN_IMAGES])
    # A data_dir holding only unverified published files is not converted behind the user's back.
    write_idx_dataset(tmp_path / "d2" / "fmnist")
    with pytest.raises(DataError, match="does not match the pinned SHA-256"):
        store.open_dataset("fmnist", str(tmp_path / "d2"))
    assert not (tmp_path / "d2" / "fmnist" / store.ARRAYS).exists()


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["tarball", "folder", "parent"])
def test_cifar_tarball_and_folder_convert_to_the_same_arrays(tmp_path, name, form):
    tarball, folder, arrays, _ = fake_cifar(
        tmp_path, name, per_batch=8 if name == "cifar10" else 40
    )
    src = {"tarball": tarball, "folder": folder, "parent": os.path.dirname(folder)}[form]
    fetch.fetch(name, str(tmp_path / "data"), from_path=src, allow_unverified=True)
    data = store.open_dataset(name, str(tmp_path / "data"))
    np.testing.assert_array_equal(data.train_x, arrays["train_x"])
    np.testing.assert_array_equal(data.train_y, arrays["train_y"])
    np.testing.assert_array_equal(data.test_x, arrays["test_x"])
    assert (
        data.train_x.shape == (40, 32, 32, 3) and data.num_classes == cifar.CIFAR[name].num_classes
    )
    assert data.meta["verified"] is False and "does not match" in data.meta["checksum_problem"]
    if name == "cifar100":
        coarse = store.open_dataset(name, str(tmp_path / "data"), labels="coarse")
        np.testing.assert_array_equal(coarse.train_y, arrays["train_c"])
        assert coarse.num_classes == 20


@pytest.mark.parametrize("form", [f for f in CIFAR_FORMS if f != "py2"])
def test_cifar_copies_re_saved_by_python3_read_the_same(tmp_path, form):
    """str or bytes keys, pickle protocols 0-5, numpy 1.x or 2.x arrays, labels as lists, arrays
    or numpy scalars: all within the restricted unpickler, all recorded as unverified."""
    for name in ("cifar10", "cifar100"):
        (tmp_path / name).mkdir()
        _, folder, arrays, _ = fake_cifar(
            tmp_path / name, name, per_batch=8 if name == "cifar10" else 40, form=form
        )
        fetch.fetch(name, str(tmp_path / "data"), from_path=folder, allow_unverified=True)
        data = store.open_dataset(name, str(tmp_path / "data"))
        np.testing.assert_array_equal(data.train_x, arrays["train_x"])
        np.testing.assert_array_equal(data.train_y, arrays["train_y"])
        np.testing.assert_array_equal(data.test_y, arrays["test_y"])
        assert data.meta["verified"] is False
    coarse = store.open_dataset("cifar100", str(tmp_path / "data"), labels="coarse")
    np.testing.assert_array_equal(coarse.train_y, arrays["train_c"])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_needs_only_the_batches_not_the_label_names(tmp_path, name):
    spec = cifar.CIFAR[name]
    tarball, folder, arrays, members = fake_cifar(tmp_path, name)
    os.remove(os.path.join(folder, spec.meta))
    short = write_cifar_tarball(tmp_path / "short.tar.gz", name, members, skip=(spec.meta,))
    for src in (folder, short):
        fetch.fetch(name, str(tmp_path / "data"), from_path=src, allow_unverified=True)
        np.testing.assert_array_equal(
            store.open_dataset(name, str(tmp_path / "data")).test_x, arrays["test_x"]
        )


def test_cifar_checksum_mismatch_is_refused_naming_the_file(tmp_path):
    tarball, folder, _, _ = fake_cifar(tmp_path)
    with pytest.raises(
        DataError,
        match=r"cifar-10-python.tar.gz \(\d+ bytes, SHA-256 \w+\) does not "
        r"match the published .*--allow_unverified",
    ):
        fetch.fetch("cifar10", str(tmp_path / "data"), from_path=tarball)
    with pytest.raises(
        DataError,
        match=r"cifar-10-batches-py/data_batch_1 \(MD5 \w+\) does not match "
        r"the published MD5 c99cafc152244af753f735de768cd75f",
    ):
        fetch.fetch("cifar10", str(tmp_path / "data"), from_path=folder)
    _no_trace(tmp_path, "cifar10")


def test_damaged_cifar_files_are_clear_errors_and_leave_nothing(tmp_path):
    tarball, folder, _, members = fake_cifar(tmp_path)
    cases = {}
    short = tmp_path / "short.tar.gz"
    short.write_bytes(open(tarball, "rb").read()[:5000])
    cases[str(short)] = "short.tar.gz"
    missing = write_cifar_tarball(
        tmp_path / "missing.tar.gz", "cifar10", members, skip=("test_batch",)
    )
    cases[missing] = "missing.tar.gz has no member cifar-10-batches-py/test_batch"
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for m, data in members.items():
        (bad / m).write_bytes(data[: len(data) // 2] if m == "data_batch_3" else data)
    cases[str(bad)] = "corrupt CIFAR file .*data_batch_3"
    notdict = tmp_path / "nd" / "cifar-10-batches-py"
    notdict.mkdir(parents=True)
    for m, data in members.items():
        (notdict / m).write_bytes(pickle.dumps([1, 2], protocol=2) if m == "data_batch_2" else data)
    cases[str(notdict)] = "data_batch_2 is not a CIFAR batch"
    for src, message in cases.items():
        with pytest.raises(DataError, match=message):
            fetch.fetch("cifar10", str(tmp_path / "data"), from_path=src, allow_unverified=True)
        _no_trace(tmp_path, "cifar10")


def test_a_hostile_pickle_cannot_run_code(tmp_path):
    tarball, folder, _, members = fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    with open(os.path.join(folder, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match=f"data_batch_1: refused to unpickle {os.name}.system") as e:
        fetch.fetch("cifar10", str(tmp_path / "data"), from_path=folder, allow_unverified=True)
    assert "corrupt" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("numpy", "load"),
        ("subprocess", "Popen"),
        ("numpy.core.multiarray", "_unknown"),
    ],
)
def test_the_unpickler_builds_data_only(module, name):
    from nodepert_dist.data import safe_pickle

    payload = pickle.PROTO + b"\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R."
    with pytest.raises(DataError, match=rf"^f: refused to unpickle {module}\.{name} "):
        safe_pickle.loads(payload, "f")
    assert safe_pickle.loads(pickle.dumps({"a": np.arange(3)}, protocol=2), "f")["a"].tolist() == [
        0,
        1,
        2,
    ]


def test_a_failed_reconversion_keeps_the_good_store(tmp_path):
    tarball, folder, arrays, members = fake_cifar(tmp_path)
    fetch.fetch("cifar10", str(tmp_path / "data"), from_path=tarball, allow_unverified=True)
    missing = write_cifar_tarball(tmp_path / "m.tar.gz", "cifar10", members, skip=("test_batch",))
    with pytest.raises(DataError, match="has no member cifar-10-batches-py/test_batch"):
        fetch.fetch("cifar10", str(tmp_path / "data"), from_path=missing, allow_unverified=True)
    assert sorted(os.listdir(tmp_path / "data" / "cifar10")) == [store.ARRAYS]  # no temp folders
    np.testing.assert_array_equal(
        store.open_dataset("cifar10", str(tmp_path / "data")).test_y, arrays["test_y"]
    )


def test_damaged_store_files_are_clear_errors(tmp_path):
    tarball, _, _, _ = fake_cifar(tmp_path)
    fetch.fetch("cifar10", str(tmp_path / "data"), from_path=tarball, allow_unverified=True)
    path = tmp_path / "data" / "cifar10" / store.ARRAYS / "train_images.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="train_images.npy .*delete .* and fetch again"):
        store.open_dataset("cifar10", str(tmp_path / "data"))
    with pytest.raises(
        DataError,
        match=r"missing dataset .*cifar100/arrays; run: python -m "
        r"nodepert_dist.data fetch cifar100",
    ):
        store.open_dataset("cifar100", str(tmp_path / "data"))
    with pytest.raises(ValueError, match="applies to --dataset=cifar100 only"):
        store.open_dataset("cifar10", str(tmp_path / "data"), labels="coarse")


# ----------------------------------------------------------------------------- the CLI


def _cli(*args):
    cmd = [sys.executable, "-m", "nodepert_dist.data", "fetch", *args]
    return run_command(cmd, timeout=120)


def test_fetch_cli_imports_or_refuses_in_one_line(tmp_path):
    tarball, folder, _, members = fake_cifar(tmp_path)
    data = f"--data_dir={tmp_path / 'data'}"
    out = _cli("cifar10", f"--from={tarball}", data)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {tarball} (")
    _no_trace(tmp_path, "cifar10")
    missing = write_cifar_tarball(tmp_path / "m.tar.gz", "cifar10", members, skip=("data_batch_4",))
    out = _cli("cifar10", f"--from={missing}", "--allow_unverified", data)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "has no member cifar-10-batches-py/data_batch_4" in out.stderr.strip().splitlines()[-1]
    _no_trace(tmp_path, "cifar10")
    out = _cli("cifar10", f"--from={folder}", "--allow_unverified", data)
    assert out.returncode == 0, out.stderr
    assert "cifar10: 200 train / 30 test examples (32, 32, 3), 10 classes, UNVERIFIED" in out.stdout
    assert "UNVERIFIED copy" in out.stderr
    meta = json.loads((tmp_path / "data" / "cifar10" / store.ARRAYS / "meta.json").read_text())
    assert meta["verified"] is False and meta["source"] == os.path.abspath(folder)
