"""Checkpoints: exact resume in a new process, kill -9 during a save, resharding on restore,
corruption and fallback, and arrays readable with bare tensorstore.

The subprocess runs train fc 784-32-32-10 on real MNIST at batch 2000 on 8 simulated devices:
30 steps per epoch, 60 in two epochs; a split at step 45 falls inside epoch 2.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from conftest import REPO, subprocess_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nodepert_dist import (
    checkpoint,
    checkpoint_faults,
    checkpoint_layout,
    checkpoint_restore,
    models,
    optim,
    params_io,
    run_record,
)
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib

TIMEOUT_S = 120
TIMING = ("epoch_time", "examples_per_s")
RUN = [
    "--hl_size=32",
    "--batchsize=2000",
    "--num_epochs=2",
    "--cpu_devices=8",
    "--noeval_train",
    "--checkpoint_every_steps=10",
]


# ----------------------------------------------------------------------------- helpers


def _env(extra=None):
    env = subprocess_env()
    env.pop(checkpoint_faults.DELAY_ENV, None)  # a fault this process set is not the command's
    env.update(extra or {})
    return env


def _cmd(workdir, data_dir, *args, faults=False):
    # faults: the run takes checkpoint_faults' settings from its environment (tests only)
    entry = (
        [
            "-c",
            "from nodepert_dist import checkpoint_faults as f; "
            "f.run_module_with_faults('nodepert_dist.train')",
        ]
        if faults
        else ["-m", "nodepert_dist.train"]
    )
    return [sys.executable, *entry, f"--data_dir={data_dir}", f"--workdir={workdir}", *RUN, *args]


def train_run(workdir, data_dir, *args) -> str:
    """Runs training in a new process; returns its log."""
    p = subprocess.run(
        _cmd(workdir, data_dir, *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def saved_arrays(path) -> dict:
    """Every array of a checkpoint, read with bare tensorstore and the manifest only."""
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    out = {}
    for entry in manifest["arrays"]:
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": os.path.join(path, "arrays", entry["name"])},
        }
        out[entry["name"]] = ts.open(spec).result().read().result()
    return out


def newest(workdir) -> str:
    directory = os.path.join(workdir, "checkpoints")
    return checkpoint_layout.step_dir(directory, checkpoint_layout.committed_steps(directory)[-1])


def rows_without_timing(workdir) -> list:
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in run_record.read_metrics(workdir)
    ]


def assert_same_run(a, b):
    """Bit-identical final train state (params, optimizer, step) and equal metric rows."""
    assert os.path.basename(newest(a)) == os.path.basename(newest(b)) == "step_00000060"
    xs, ys = saved_arrays(newest(a)), saved_arrays(newest(b))
    assert xs.keys() == ys.keys()
    for name in xs:
        np.testing.assert_array_equal(xs[name], ys[name], err_msg=name, strict=True)
    rows = rows_without_timing(a)
    members = len({r.get("member") for r in rows})  # a population: a row per member and epoch
    assert [r["epoch"] for r in rows] == [e for e in (0, 1, 2) for _ in range(members)]
    assert rows == rows_without_timing(b)


@pytest.fixture(scope="module")
def straight_np(tmp_path_factory, mnist_dir):
    """The uninterrupted NP run: 60 steps."""
    workdir = tmp_path_factory.mktemp("straight_np")
    train_run(workdir, mnist_dir)
    return workdir


# ----------------------------------------------------------------------------- exact resume

RESUMED_RULES = {
    "np": [],
    # SGD runs with Adam so that a non-trivial optimizer state must be restored as well, and
    # with decorrelation: its matrices are train state too (TrainState.decor).
    "sgd-adam-decorrelate": [
        "--update_rule=sgd",
        "--optimizer=adam",
        "--lr=1e-3",
        "--decorrelate",
        "--decorrelate_lr=1e-3",
    ],
    # a population: the stacked state, the members' alive marks and per-member sums and rows
    "np-population": ["--population=lr:0.01,0.05;seed:0,1"],
}


@pytest.mark.parametrize("rule", list(RESUMED_RULES))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_resume_in_new_process_is_exact(rule, straight_np, tmp_path, mnist_dir):
    extra = RESUMED_RULES[rule]
    if rule == "np":
        straight = straight_np
    else:
        straight = tmp_path / "straight"
        train_run(straight, mnist_dir, *extra)
    split = tmp_path / "split"
    train_run(split, mnist_dir, "--max_steps=45", *extra)
    assert os.path.basename(newest(split)) == "step_00000045"
    members = 4 if any(a.startswith("--population") for a in extra) else 1  # rows per epoch
    assert [r["epoch"] for r in run_record.read_metrics(split)] == [0] * members + [1] * members
    final = tmp_path / "final.npz"
    log = train_run(split, mnist_dir, *extra, f"--save_final_params={final}")
    assert "resumed from" in log and "epoch 2, step 15 of the epoch (step 45 in all)" in log
    assert_same_run(straight, split)
    saved = saved_arrays(newest(split))
    decor = [n for n in saved if n.startswith("decor.")]
    assert len(decor) == (3 if "--decorrelate" in extra else 0), decor
    with np.load(final) as params:  # the final parameters, with the matrices if any
        assert sorted(params) == sorted(
            [n[len("params.") :] for n in saved if n.startswith("params.")]
            + [n.replace("decor.", "decorrelation.", 1) for n in decor]
        )
        for name in decor:
            np.testing.assert_array_equal(
                params[name.replace("decor.", "decorrelation.", 1)], saved[name]
            )


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_kill_during_save_resumes_from_previous_checkpoint(straight_np, tmp_path, mnist_dir):
    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    # Saves from step 30 on stall 60 s after their first array: kill -9 lands inside one.
    proc = subprocess.Popen(
        _cmd(workdir, mnist_dir, faults=True),
        env=_env({checkpoint_faults.DELAY_ENV: "60@30"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        partial = []
        while not partial:
            assert proc.poll() is None, "training exited before the delayed save"
            assert time.monotonic() < deadline, "the delayed save never started"
            time.sleep(0.1)
            partial = list(ckpts.glob(".tmp-step_00000030-*/arrays/step/zarr.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert checkpoint_layout.committed_steps(ckpts) == [10, 20]  # step 30 was in flight: invisible
    log = train_run(workdir, mnist_dir)
    assert "epoch 1, step 20 of the epoch (step 20 in all)" in log
    assert not list(ckpts.glob(".tmp-*"))  # the partial save was cleaned up
    assert_same_run(straight_np, workdir)


# ----------------------------------------------------------------------------- in process


def _state(mesh, hl_size=16, seed=0):
    """A real train state (Adam: step, params, mu, nu, count) plus an array sharded on `data`."""
    model = models.build_model("fc", 10, 2, hl_size)
    optimizer = optim.make_optimizer("adam", 1e-3, 0.0)
    state = step_lib.init_state(model, optimizer, np.zeros((1, 784), np.float32), seed, mesh)
    sharded = jax.device_put(
        jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3) + seed,
        NamedSharding(mesh, P(mesh_lib.DATA)),
    )
    return {"train": state, "sharded": sharded}


def _save(directory, tree, step, **kw):
    saver = checkpoint.Checkpointer(str(directory), **kw)
    saver.save(step, tree, meta={"loop": {"step": step}})
    saver.wait()


@pytest.mark.parametrize("k", [4, 1])
def test_saved_on_8_devices_restores_on_fewer(k, tmp_path):
    mesh8 = mesh_lib.make_mesh(jax.devices()[:8])
    tree = _state(mesh8, seed=3)
    _save(tmp_path, tree, 7)
    # Each of the 8 shards of the sharded array is its own chunk, written by its holder.
    chunks = list((tmp_path / "step_00000007/arrays/sharded/c").iterdir())
    assert len(chunks) == 8
    mesh_k = mesh_lib.make_mesh(jax.devices()[:k])
    target = _state(mesh_k, seed=0)
    restored, manifest = checkpoint_restore.restore(str(tmp_path), target)
    assert manifest["step"] == 7
    for (path, got), want, tgt in zip(
        jax.tree_util.tree_leaves_with_path(restored),
        jax.tree.leaves(tree),
        jax.tree.leaves(target),
    ):
        assert got.sharding == tgt.sharding, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


def test_bare_tensorstore_reads_the_live_arrays(tmp_path):
    mesh = mesh_lib.make_mesh()
    tree = _state(mesh, seed=5)
    _save(tmp_path, tree, 3)
    path = tmp_path / "step_00000003"
    with open(path / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["step"] == 3 and manifest["versions"]["jax"] == jax.__version__
    saved = saved_arrays(path)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert [e["name"] for e in manifest["arrays"]] == [params_io.leaf_name(p) for p, _ in leaves]
    for entry, (_, live) in zip(manifest["arrays"], leaves):
        assert (tuple(entry["shape"]), entry["dtype"]) == (live.shape, str(live.dtype))
        np.testing.assert_array_equal(saved[entry["name"]], np.asarray(live), strict=True)


def _truncate_chunk(step_path):
    chunk = step_path / "arrays/train.params.layer0.kernel/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:100])


def _flip_byte(step_path):
    chunk = step_path / "arrays/train.params.layer0.kernel/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _delete_array(step_path):
    shutil.rmtree(step_path / "arrays/train.params.layer0.kernel")


def _wrong_manifest_shape(step_path):
    manifest = json.loads((step_path / "manifest.json").read_text())
    entry = next(e for e in manifest["arrays"] if e["name"] == "train.params.layer0.kernel")
    entry["shape"] = [784, 17]
    (step_path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "corrupt", [_truncate_chunk, _flip_byte, _delete_array, _wrong_manifest_shape]
)
def test_corrupt_checkpoint_falls_back_then_errors(corrupt, tmp_path, caplog):
    mesh = mesh_lib.make_mesh()
    _save(tmp_path, _state(mesh, seed=1), 1)
    _save(tmp_path, _state(mesh, seed=2), 2)
    corrupt(tmp_path / "step_00000002")
    target = _state(mesh, seed=0)
    with caplog.at_level(logging.WARNING):
        restored, manifest = checkpoint_restore.restore(str(tmp_path), target)
    assert manifest["step"] == 1
    np.testing.assert_array_equal(
        np.asarray(restored["sharded"]), np.asarray(_state(mesh, seed=1)["sharded"])
    )
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "train.params.layer0.kernel" in warning and "falling back to step 1" in warning
    # The unreadable one (perhaps a transient error) is set aside, never deleted, so a later
    # save cannot prune it as "newer than the step just saved".
    aside = [n for n in os.listdir(tmp_path) if n.startswith(".unreadable-step_00000002-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "manifest.json").exists()
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [1]
    # With no valid checkpoint left: a clear one-line error naming the array.
    corrupt(tmp_path / "step_00000001")
    with pytest.raises(checkpoint_layout.CorruptCheckpoint) as e:
        checkpoint_restore.restore(str(tmp_path), target)
    assert "train.params.layer0.kernel" in str(e.value) and "\n" not in str(e.value)
    assert len([n for n in os.listdir(tmp_path) if n.startswith(".unreadable-")]) == 2


def test_prune_sets_newer_checkpoints_aside_never_deletes_them(tmp_path):
    mesh = mesh_lib.make_mesh()
    for step in (1, 2, 3):
        _save(tmp_path, _state(mesh, seed=step), step, keep=1)
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [3]
    _save(tmp_path, _state(mesh, seed=9), 2, keep=1)  # e.g. a run restarted from step 1
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [2]
    aside = [n for n in os.listdir(tmp_path) if n.startswith(".superseded-step_00000003-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "manifest.json").exists()


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    mesh = mesh_lib.make_mesh()
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(1, _state(mesh, seed=1), meta={})
    with checkpoint_faults.inject(
        checkpoint_faults.Faults(fail_process=0, fail_from_step=2, fail_errno="ENOSPC")
    ):
        saver.save(2, _state(mesh, seed=2), meta={})
        with pytest.raises(checkpoint_layout.CheckpointError) as e:
            saver.wait()
    assert str(e.value).startswith(
        "saving checkpoint step 2 failed on process 0: OSError: [Errno 28] No space left on device"
    )
    assert "\n" not in str(e.value)
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [1]
    restored, manifest = checkpoint_restore.restore(str(tmp_path), _state(mesh))
    assert manifest["step"] == 1
    np.testing.assert_array_equal(
        np.asarray(restored["sharded"]), np.asarray(_state(mesh, seed=1)["sharded"])
    )


def test_fault_variables_are_ignored_unless_a_test_turns_them_on(tmp_path, monkeypatch):
    """The production save reads no test variable: faults come only through checkpoint_faults."""
    monkeypatch.setenv("NODEPERT_CKPT_TEST_FAIL", "0@1:ENOSPC")
    monkeypatch.setenv("NODEPERT_CKPT_TEST_HIDE_NEWEST", "0")
    mesh = mesh_lib.make_mesh()
    _save(tmp_path, _state(mesh, seed=1), 1)
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [1]


def test_other_model_is_a_clear_error(tmp_path):
    mesh = mesh_lib.make_mesh()
    _save(tmp_path, _state(mesh, hl_size=16), 1)
    with pytest.raises(checkpoint_layout.CheckpointError) as e:
        checkpoint_restore.restore(str(tmp_path), _state(mesh, hl_size=24))
    assert not isinstance(e.value, checkpoint_layout.CorruptCheckpoint)
    assert "'train.params.layer0.bias'" in str(e.value) and "(24,)" in str(e.value)
    assert "\n" not in str(e.value)


def test_keep_newest_and_every_kth(tmp_path):
    mesh = mesh_lib.make_mesh()
    tree = _state(mesh)
    saver = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_every_steps=4)
    for step in range(1, 10):
        saver.save(step, tree, meta={})
    saver.wait()
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [4, 8, 9]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000008", "step_00000009"]


def test_pending_save_is_invisible_until_committed(tmp_path):
    mesh = mesh_lib.make_mesh()
    saver = checkpoint.Checkpointer(str(tmp_path))
    with checkpoint_faults.inject(checkpoint_faults.Faults(delay_s=1.0)):
        t0 = time.perf_counter()
        saver.save(5, _state(mesh), meta={})
        assert time.perf_counter() - t0 < 0.9  # the loop does not wait for the write
        assert checkpoint_layout.committed_steps(str(tmp_path)) == []
        assert checkpoint_restore.restore(str(tmp_path), _state(mesh)) is None
        saver.wait()
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [5]


# ----------------------------------------------------------------------------- two processes

_WORKER = """
import sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from nodepert_dist import checkpoint, checkpoint_restore, mesh as mesh_lib

mesh = mesh_lib.make_mesh()
full = {"sharded": np.arange(48, dtype=np.float32).reshape(16, 3), "replicated": np.arange(5, dtype=np.int32)}
specs = {"sharded": P(mesh_lib.DATA), "replicated": P()}
make = lambda src: {k: jax.make_array_from_callback(src[k].shape, NamedSharding(mesh, specs[k]),
                                                    lambda idx, k=k: src[k][idx]) for k in src}
saver = checkpoint.Checkpointer(directory)
saver.save(1, make(full), meta={"loop": {}}, position={"epoch": 1, "process_index": pid})
saver.wait()
restored, manifest = checkpoint_restore.restore(directory, make({k: np.zeros_like(v) for k, v in full.items()}))
for k, arr in restored.items():
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[k][shard.index])
print("OK", pid, len(jax.devices()), [p["position"] for p in manifest["processes"]], flush=True)
"""


def test_two_processes_write_their_own_shards_and_commit_once(tmp_path):
    """2 processes x 4 devices: each writes its 4 shards and a done marker; one commit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(i), str(port), str(tmp_path)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"OK {i} 8 " in out
    path = tmp_path / "step_00000001"
    assert sorted(os.listdir(path / "done")) == ["process_0.json", "process_1.json"]
    assert len(list((path / "arrays/sharded/c").iterdir())) == 8
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["process_count"] == 2
    assert [p["position"]["process_index"] for p in manifest["processes"]] == [0, 1]
    np.testing.assert_array_equal(
        saved_arrays(path)["sharded"], np.arange(48, dtype=np.float32).reshape(16, 3)
    )
