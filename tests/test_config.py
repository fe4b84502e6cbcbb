"""Settings: one declaration per setting (Config field -> flag), presets and JSON config files."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO

from nodepert_dist import config


@pytest.fixture
def parse():
    """Parses a command line into the global absl flags, and un-parses it afterwards."""

    def _parse(*args):
        config.FLAGS.unparse_flags()
        config.FLAGS(["nodepert-train", *args])
        return config.from_flags()

    yield _parse
    config.FLAGS.unparse_flags()


def test_every_setting_is_a_flag_with_its_default_and_help():
    for f in dataclasses.fields(config.Config):
        flag = config.FLAGS[f.name]
        assert flag.default == f.default and flag.help.endswith(f.metadata["help"]), f.name
        if f.metadata["choices"]:
            assert list(flag.parser.enum_values) == list(f.metadata["choices"]), f.name


def test_flags_override_a_preset_which_overrides_the_defaults(parse):
    assert parse() == config.Config()
    cfg = parse("--config=mnist_fc_np", "--lr=0.05")
    expected = dataclasses.replace(config.Config(), **config.PRESETS["mnist_fc_np"])
    assert cfg == dataclasses.replace(expected, lr=0.05)
    assert cfg.update_rule == "np" and expected.lr == 0.02


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_every_preset_is_a_valid_run(name):
    config.Config(**config.overrides(name)).validate()  # a broken preset never reaches a user


def test_json_config_file(parse, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"network": "conv", "sigma": 1e-3, "eval_train": False}))
    cfg = parse(f"--config={path}", "--seed=3")
    assert (cfg.network, cfg.sigma, cfg.eval_train, cfg.seed) == ("conv", 1e-3, False, 3)
    path.write_text(json.dumps({"netwrok": "conv"}))
    with pytest.raises(ValueError, match="unknown setting.* netwrok"):
        parse(f"--config={path}")
    path.write_text(json.dumps({"network": "mlp"}))
    with pytest.raises(ValueError, match="network='mlp'"):
        parse(f"--config={path}")
    with pytest.raises(ValueError, match="neither a preset"):
        parse("--config=nonexistent")


def _help(module):
    return subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_train_help_lists_this_programs_flags_by_group():
    out = _help("nodepert_dist.train")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Try --helpfull" not in text and "--logtostderr" not in text  # absl's own flags
    groups = [g for g in config.GROUPS if f"\n{g}:\n" in text]
    assert groups == list(config.GROUPS)
    for f in dataclasses.fields(config.Config):
        assert f"--{f.name}" in text or f"--[no]{f.name}" in text, f.name
    assert text.index("\nmodel:") < text.index("--n_hl") < text.index("\ntraining:")
    assert "--coordinator_address" in text.split("\ncluster:")[1]


def test_plot_help_lists_its_flags():
    out = _help("nodepert_dist.plot")
    assert out.returncode == 0, out.stderr
    assert "Try --helpfull" not in out.stdout and "--workdirs" in out.stdout


@pytest.mark.parametrize(
    "settings,message",
    [
        # optax itself refuses this shape: the lr would peak at a third of --lr, no cosine at all
        (
            dict(lr_schedule="cosine", warmup_epochs=3, num_epochs=1),
            r"--warmup_epochs=3 does not end inside the cosine schedule's 1 epochs",
        ),
        (dict(warmup_epochs=10, num_epochs=10), r"--warmup_epochs=10 does not end inside --num_ep"),
        (
            dict(lr_decay_epochs=2),
            r"--lr_decay_epochs and --lr_decay_factor apply to "
            r"--lr_schedule=step only; --lr_schedule=constant ignores them",
        ),
        (dict(lr_schedule="cosine", lr_decay_factor=0.5), r"--lr_schedule=cosine ignores them"),
        (dict(lr_schedule_epochs=20), r"--lr_schedule=constant ignores it"),
        (
            dict(lr_schedule="step", lr_decay_epochs=10, num_epochs=10),
            r"the first decay comes after epoch 10, not inside the run's --num_epochs=10",
        ),
        (
            dict(lr_schedule="step", lr_decay_epochs=4, warmup_epochs=6, num_epochs=10),
            r"the first decay comes after epoch 10",
        ),
        (
            dict(lr_schedule="step", lr_decay_epochs=2, lr_decay_factor=2.0),
            r"--lr_decay_factor=2 must be in \(0, 1\): it would make the lr grow",
        ),
        (
            dict(lr_schedule="step", lr_decay_epochs=2, lr_decay_factor=0.0),
            r"the lr would be 0 after the first decay",
        ),
        (
            dict(lr_schedule="cosine", lr_schedule_epochs=5, num_epochs=10),
            r"--num_epochs=10 goes past the cosine schedule's 5 epochs",
        ),
    ],
)
def test_schedule_settings_that_cannot_take_effect_are_refused(settings, message):
    """main ran every one of these (exit 0) with an lr other than the one asked for."""
    with pytest.raises(ValueError, match=message) as e:
        config.Config(**settings).validate()
    assert "\n" not in str(e.value)


def test_schedule_settings_that_take_effect_pass():
    for settings in (
        dict(lr_schedule="cosine", warmup_epochs=1, num_epochs=2),
        dict(lr_schedule="cosine", lr_schedule_epochs=20, num_epochs=10),
        dict(lr_schedule="step", lr_decay_epochs=3, lr_decay_factor=0.5),
        dict(warmup_epochs=0.5, num_epochs=1),
    ):
        config.Config(**settings).validate()


def test_cli_refuses_a_warm_up_longer_than_the_cosine_before_compiling(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodepert_dist.train",
            "--lr_schedule=cosine",
            "--warmup_epochs=3",
            "--num_epochs=1",
            f"--workdir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --warmup_epochs=3 does not end")
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled
