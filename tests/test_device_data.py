"""--data_on_device (device_data.py): the training split on the devices, batches gathered inside
the loop's call. The same batches as the host pipeline, so the same run bit for bit."""

import json
import os
import threading

import numpy as np
import pytest

from nodepert_dist import checkpoint_layout, config, device_data, train
from nodepert_dist import mesh as mesh_lib
from nodepert_dist.data import pipeline

TIMING = ("epoch_time", "examples_per_s")
# 8 devices; 1000 training examples: 10 steps of 96 an epoch
TINY = dict(
    n_hl=1, hl_size=16, batchsize=96, validation_size=59000, eval_train=False, eval_batchsize=4000
)


def _record(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    ckpts = os.path.join(workdir, "checkpoints")
    saved = {}
    for s in checkpoint_layout.committed_steps(ckpts):
        loop = checkpoint_layout.read_manifest(checkpoint_layout.step_dir(ckpts, s))["loop"]
        saved[s] = [{k: v for k, v in r.items() if k not in TIMING} for r in loop["rows"]]
        saved[s] = (saved[s], loop["epoch"], loop["step_in_epoch"], loop["sums"])
    with np.load(os.path.join(workdir, "final.npz")) as final:
        params = {k: final[k].tobytes() for k in final.files}
    return rows, saved, params


@pytest.mark.slow  # three short trainings
def test_the_device_gathered_batches_train_the_host_pipelines_run(tmp_path, mnist_dir, monkeypatch):
    """NP on 8 devices, zca preprocessing, 17 steps over 2 epochs with a checkpoint every 6:
    the rows, every checkpoint's loop record and the final parameters are the host pipeline's,
    one step per call and 4 per call; no batch is assembled on the host."""
    assembled = []
    global_batch = mesh_lib.global_batch

    def spy(mesh, x, *rest, **kw):  # a training batch assembled on the host (eval's are 4000)
        assembled.append(x.shape[-4] == TINY["batchsize"])
        return global_batch(mesh, x, *rest, **kw)

    monkeypatch.setattr(mesh_lib, "global_batch", spy)
    runs = {}
    for name, kw in {
        "host": {},
        "device": dict(data_on_device=True),
        "device_k4": dict(data_on_device=True, steps_per_call=4, metrics_every=4),
    }.items():
        workdir = str(tmp_path / name)
        cfg = train.Config(
            **TINY,
            data_dir=mnist_dir,
            workdir=workdir,
            update_rule="np",
            preprocess="zca",
            num_epochs=2,
            max_steps=17,
            checkpoint_every_steps=6,
            keep_checkpoints=0,
            save_final_params=os.path.join(workdir, "final.npz"),
            **kw,
        )
        assembled.clear()
        train.run(cfg)
        assert any(assembled) == (name == "host"), name
        runs[name] = _record(workdir)
    host = runs.pop("host")
    assert sorted(host[1]) == [6, 10, 12, 17]
    for name, got in runs.items():
        assert got == host, name


def test_augmentation_is_refused_in_one_line():
    with pytest.raises(ValueError, match="drop one of them"):
        config.Config(data_on_device=True, augment=True).validate()


def test_the_next_epochs_order_is_made_ahead_on_a_thread_and_is_the_same(monkeypatch):
    """After epoch e's order, epoch e+1's is made on a thread (not between the epochs, where the
    device waits for it), bit for bit the order made on demand; any other epoch is made then."""
    made = []  # (epoch, thread) of each permutation
    epoch_order = pipeline.epoch_order

    def spy(seed, epoch, lo, hi):
        made.append((epoch, threading.current_thread().name.startswith("next_epoch_order")))
        return epoch_order(seed, epoch, lo, hi)

    monkeypatch.setattr(pipeline, "epoch_order", spy)
    mesh = mesh_lib.make_mesh()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (1000, 4), np.uint8), rng.integers(0, 10, 1000)
    data, fresh = (device_data.DeviceData(mesh, images, labels) for _ in range(2))
    kw = dict(seed=3, rows=(0, 1000), global_batch=96)
    epochs = (1, 2, 3, 5, 6)  # 4's, made ahead, goes unused
    got = [data.epoch_order(epoch=e, ahead=e < 6, **kw) for e in epochs]
    for thread in threading.enumerate():  # epoch 4's, unused: let it finish before counting
        if thread.name.startswith("next_epoch_order"):
            thread.join()
    assert sorted(made) == [(1, False), (2, True), (3, True), (4, True), (5, False), (6, True)]
    for e, order in zip(epochs, got):
        want = fresh.epoch_order(epoch=e, ahead=False, **kw)
        assert order.sharding == want.sharding
        assert np.asarray(order).tobytes() == np.asarray(want).tobytes()
