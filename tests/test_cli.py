"""The command-line surface: nodepert-train's files and errors, and nodepert-plot."""

import codecs
import csv
import json
import sys

import jax
import pytest
from conftest import run_command
from conftest import train_command as _train


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_train_writes_config_metrics_jsonl_and_csv(tmp_path, mnist_dir):
    workdir = tmp_path / "run"
    out = _train(
        [
            "--update_rule=np",
            "--n_hl=1",
            "--hl_size=32",
            "--num_epochs=1",
            "--batchsize=256",
            f"--data_dir={mnist_dir}",
            f"--workdir={workdir}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["update_rule"] == "np" and config["sigma"] == 1e-4 and config["batchsize"] == 256
    machine = config["machine"]  # what it ran on and how it was compiled (reproducibility)
    assert machine["platform"] == "cpu" and machine["processes"] == 1 and machine["devices"] >= 1
    assert machine["deterministic"] is False and machine["jax"] == jax.__version__
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["step"] == 60000 // 256
    for key in ("train_acc", "test_acc", "train_loss", "epoch_time", "examples_per_s"):
        assert key in rows[1], key
    assert rows[1]["test_acc"] > rows[0]["test_acc"]
    with open(workdir / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [0, 1]
    assert float(table[1]["test_acc"]) == pytest.approx(rows[1]["test_acc"])
    # Quiet logs off a terminal: one progress line per epoch, one line per checkpoint, no
    # backend probing.
    lines = out.stderr.splitlines()
    assert len([l for l in lines if "epoch 1 [" in l]) == 1
    assert len([l for l in lines if "checkpoint step" in l]) == 1
    assert "Unable to initialize backend" not in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batchsize=100"], "--batchsize=100 is not divisible by the 8 devices"),
        (["--lr=-1"], "--lr=-1.0 must be positive"),
        (
            ["--data_dir=/nonexistent"],
            "missing dataset /nonexistent/mnist/arrays; run: python -m nodepert_dist.data fetch mnist",
        ),
        (["--network=resnet50"], "--network"),
        (
            ["--dtype=bfloat16", "--sigma=1e-3"],
            "--sigma=0.001 is below 0.03, the smallest sigma at which NP on fc in bfloat16",
        ),
        (["--network=vgg", "--norm=batch"], "--norm"),
        (["--network=vgg", "--width=0"], "--width=0 must be positive"),
        (["--np_microbatches=3"], "--np_microbatches=3 does not divide the 16 examples per device"),
        (["--np_microbatches=0"], "--np_microbatches=0 must be positive"),
        (["--np_mode=lazy"], "--np_mode"),
        (
            ["--np_estimator=original", "--np_layerwise"],
            "--np_estimator=original is the original code's estimator as it was, a reference; drop "
            "--np_layerwise",
        ),
    ],
)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_bad_input_is_a_one_line_error_before_any_work(tmp_path, args, message):
    out = _train([f"--workdir={tmp_path / 'run'}", *args], timeout=120)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_original_estimator_is_warned_about_and_labelled(tmp_path, mnist_dir):
    """--np_estimator=original: one warning line at start, recorded in config.json, named in the
    plot legend."""
    workdir = tmp_path / "original"
    out = _train(
        [
            "--update_rule=np",
            "--np_estimator=original",
            "--n_hl=1",
            "--hl_size=8",
            "--num_epochs=1",
            "--max_steps=2",
            "--batchsize=256",
            "--noeval_train",
            f"--data_dir={mnist_dir}",
            f"--workdir={workdir}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    warned = [line for line in out.stderr.splitlines() if "BIASED" in line]
    assert len(warned) == 1 and "--np_estimator=original" in warned[0], warned
    assert json.loads((workdir / "config.json").read_text())["np_estimator"] == "original"
    from nodepert_dist import plot

    assert "original estimator, biased" in plot.run_label(str(workdir))


def test_plot_draws_the_learning_curves(tmp_path):
    for rule, accs in (("np", [0.1, 0.5, 0.7]), ("sgd", [0.1, 0.9, 0.95])):
        run = tmp_path / rule
        run.mkdir()
        (run / "config.json").write_text(
            json.dumps(
                {
                    "update_rule": rule,
                    "network": "fc",
                    "lr": 0.01,
                    "optimizer": "sgd",
                    "loss": "mse",
                    "dataset": "fmnist",
                    "sigma": 1e-4 if rule == "np" else 1e-4,
                }
            )
        )
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"epoch": e, "test_acc": a, "test_loss": 1 - a, "epoch_time": e and 2.0})
                + "\n"
                for e, a in enumerate(accs)
            )
        )
    for extra in ([], ["--metric=test_loss", "--x=time"]):
        out_png = tmp_path / "curves.png"
        out = run_command(
            [
                sys.executable,
                "-m",
                "nodepert_dist.plot",
                *extra,
                f"--workdirs={tmp_path / 'np'},{tmp_path / 'sgd'}",
                f"--out={out_png}",
            ],
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
        out_png.unlink()
    from nodepert_dist import plot

    np_label, sgd_label = (
        plot.run_label(str(tmp_path / "np")),
        plot.run_label(str(tmp_path / "sgd")),
    )
    assert np_label.startswith("NP (node perturbation, sigma=0.0001; sgd optimizer)")
    assert sgd_label.startswith("SGD (backprop; sgd optimizer)")
    assert plot.title([str(tmp_path / "np"), str(tmp_path / "sgd")]) == "fmnist: fc"


def test_json_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors start UTF-8 files with a BOM: --config files and a run's config.json."""
    from nodepert_dist import config, plot

    settings = {"update_rule": "sgd", "lr": 0.5, "optimizer": "sgd", "loss": "ce"}
    path = tmp_path / "settings.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(settings).encode())
    assert config.overrides(str(path)) == settings
    (tmp_path / "config.json").write_bytes(path.read_bytes())
    assert plot.run_label(str(tmp_path)) == "SGD (backprop; sgd optimizer), lr=0.5, ce loss"


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_every_module_imports_into_one_process():
    """Library users (and one test process) import many modules at once: none may define an
    absl flag that another defines too (plot's and the experiments' --out once clashed). Each
    experiment command is loaded alone by `nodepert-experiment NAME`, so each is imported
    beside the whole library, not beside the other commands."""
    from nodepert_dist.experiments import EXPERIMENTS

    # One process: the library, then each command alone beside it (the flags a command
    # defined are deleted, and it is forgotten, before the next is imported).
    commands = [module for module, _ in EXPERIMENTS.values()]
    code = (
        "import importlib, pkgutil, sys, nodepert_dist\n"
        "from absl import flags\n"
        "commands = ['nodepert_dist.experiments.' + m for m in sys.argv[1:]]\n"
        "for m in pkgutil.walk_packages(nodepert_dist.__path__, 'nodepert_dist.'):\n"
        "    if not m.name.endswith('__main__') and m.name not in commands:\n"
        "        importlib.import_module(m.name)\n"
        "library = set(flags.FLAGS)\n"
        "for name in commands:\n"
        "    importlib.import_module(name)\n"
        "    for f in set(flags.FLAGS) - library:\n"
        "        delattr(flags.FLAGS, f)\n"
        "    del sys.modules[name]\n"
        "print(len(commands), 'commands')\n"
    )
    out = run_command([sys.executable, "-c", code, *commands], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(commands)), "commands"]
