"""nodepert-train on generated CIFAR (imported with --allow_unverified): the dataset flags work
end to end, the unverified copy is recorded in config.json, and a run stopped mid-epoch and
resumed with augmentation ends exactly like an uninterrupted one."""

import json
import sys

import pytest
from _fake_data import fake_cifar
from conftest import REPO, run_command, train_command

from nodepert_dist.data import fetch

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips


def _train(args, timeout=300):
    return train_command(args, devices=4, timeout=timeout)


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    tarball, _, _, _ = fake_cifar(root, "cifar100", per_batch=360, n_test=40)
    fetch.fetch("cifar100", str(root / "data"), from_path=tarball, allow_unverified=True)
    return str(root / "data")


SMALL = [
    "--dataset=cifar100",
    "--cifar100_labels=coarse",
    "--network=fc",
    "--n_hl=1",
    "--hl_size=16",
    "--batchsize=40",
    "--eval_batchsize=40",
    "--validation_size=40",
    "--augment",
    "--preprocess=zca",
    "--num_epochs=2",
    "--update_rule=sgd",
    "--lr=0.1",
]


def test_cifar_trains_with_augmentation_validation_and_zca(cifar100_dir, tmp_path):
    out = _train([*SMALL, f"--data_dir={cifar100_dir}", f"--workdir={tmp_path}/run"])
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        config["data"]["verified"] is False
        and "does not match" in config["data"]["checksum_problem"]
    )
    assert config["preprocess_resolved"] == "zca"
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [0, 8, 16]  # (360 - 40) / 40 steps per epoch
    assert all("val_acc" in r and "test_acc" in r and "train_acc" in r for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_resume_mid_epoch_with_augmentation_is_exact(cifar100_dir, tmp_path):
    common = [*SMALL, f"--data_dir={cifar100_dir}", "--checkpoint_every_steps=3"]
    whole = _train([*common, f"--workdir={tmp_path}/whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _train([*common, f"--workdir={tmp_path}/cut", "--max_steps=11"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train([*common, f"--workdir={tmp_path}/cut"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    untimed = lambda line: {
        k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "examples_per_s")
    }
    rows = lambda run: [
        untimed(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows("cut") == rows("whole")


def test_resume_mid_epoch_under_another_data_order_is_refused(cifar100_dir, tmp_path):
    common = [
        *SMALL,
        f"--data_dir={cifar100_dir}",
        f"--workdir={tmp_path}/run",
        "--checkpoint_every_steps=3",
    ]
    first = _train([*common, "--max_steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    (manifest,) = (tmp_path / "run" / "checkpoints").glob("step_*/manifest.json")
    saved = json.loads(manifest.read_text())
    saved["rng"]["data_order"] = "shuffle seed from (seed, epoch)"  # what earlier versions wrote
    manifest.write_text(json.dumps(saved))
    second = _train(common)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert "stopped mid-epoch under another data order" in second.stderr


def test_a_two_process_checkpoint_resumes_on_one_process(cifar100_dir, tmp_path):
    """The data position is global (epoch, step): a run cut mid-epoch on 2 processes x 2 devices
    continues on 1 process x 4 devices with neither repeated nor skipped examples.
    per_channel, not SMALL's zca: ZCA from 320 examples of 3072 pixels scales the null space of
    their covariance by 1/sqrt(eps) ~ 316, so the augmented (shifted) images turn last-bit
    differences between the layouts' matmul threading into percent-level ones (measured)."""
    common = [
        *SMALL,
        f"--data_dir={cifar100_dir}",
        "--checkpoint_every_steps=5",
        "--preprocess=per_channel",
    ]
    cut = run_command(
        [
            sys.executable,
            str(REPO / "launch" / "local.py"),
            "--num_processes=2",
            "--devices_per_process=2",
            "--timeout_s=150",
            "--",
            sys.executable,
            "-m",
            "nodepert_dist.train",
            *common,
            f"--workdir={tmp_path}/cut",
            "--max_steps=5",
        ],
        timeout=180,
    )
    assert cut.returncode == 0, cut.stdout[-3000:]
    resumed = _train([*common, f"--workdir={tmp_path}/cut"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    whole = _train([*common, f"--workdir={tmp_path}/whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    rows = lambda run: [
        json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    ]
    a, b = rows("cut"), rows("whole")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 8, 16]
    # SGD: the layouts differ only in the order of cross-device sums (last-bit differences);
    # a repeated or skipped batch would move the losses by percents.
    for ra, rb in zip(a, b):
        for k in ("train_loss", "test_loss", "val_loss", "mean_step_loss"):
            if k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5), (k, ra[k], rb[k])
