"""Every command the package ships, given bad input, answers with one `error:` line and no
traceback, before any work: the console scripts of setup.py, each experiment,
`python -m nodepert_dist.data` and the benchmark scripts. (launch/*.py: tests/test_sweep.py
and tests/test_multiprocess.py.)"""

import re
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from nodepert_dist.experiments import EXPERIMENTS

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

CONSOLE_SCRIPTS = dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', (REPO / "setup.py").read_text()))


def _console(name, *args):
    """The console script `name` exactly as setup.py declares it (module:function)."""
    module, func = CONSOLE_SCRIPTS[name].split(":")
    return [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())",
        *args,
    ]


def _bench(name, *args):
    return [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args]


NO_VALUE = "a --no<flag> takes no value; write --no"
CASES = {  # name: (command, what its error line must say)
    "train --noX=value": (_console("nodepert-train", "--noeval_train=true"), NO_VALUE),
    "train population of a shape setting": (
        _console("nodepert-train", "--population=width:16,32"),
        "--population: width cannot vary within a population",
    ),
    "train member groups that do not divide the devices": (
        _console(
            "nodepert-train", "--cpu_devices=8", "--population=lr:0.1,0.2,0.3", "--member_devices=3"
        ),
        "--member_devices=3 does not divide the 8 devices; use one of 1, 2, 4, 8",
    ),
    "train member groups without a population": (
        _console("nodepert-train", "--member_devices=2"),
        "--member_devices=2 spreads a --population's members over devices",
    ),
    "plot --noX=value": (_console("nodepert-plot", "--nologtostderr=true"), NO_VALUE),
    "plot missing workdir": (
        _console("nodepert-plot", "--workdirs=/nonexistent/run"),
        "/nonexistent/run is not a folder",
    ),
    "experiment unknown": (
        _console("nodepert-experiment", "no-such-experiment"),
        "unknown experiment 'no-such-experiment'; choose one of vary-lr",
    ),
    **{
        f"experiment {name} --noX=value": (
            _console("nodepert-experiment", name, "--noeval_train=true"),
            NO_VALUE,
        )
        for name in EXPERIMENTS
    },
    "experiment with --population": (
        _console("nodepert-experiment", "vary-lr", "--population=lr:0.1,0.2"),
        "--population: vary-lr runs its own grid of runs; drop --population",
    ),
    "experiment stray argument": (
        _console("nodepert-experiment", "vary-lr", "extra"),
        "unexpected arguments: extra",
    ),
    "data no command": ([sys.executable, "-m", "nodepert_dist.data"], "expected `fetch NAME...`"),
    "data --noX=value": (
        [sys.executable, "-m", "nodepert_dist.data", "fetch", "mnist", "--noallow_unverified=true"],
        NO_VALUE,
    ),
    "data unknown flag": (
        [sys.executable, "-m", "nodepert_dist.data", "fetch", "mnist", "--form=x"],
        "Unknown command line flag 'form'",
    ),
    "throughput unknown network": (
        _bench("throughput", "--networks=fc,bogus"),
        "'bogus' is not one of",
    ),
    "device_scaling bad layout": (_bench("device_scaling", "--layouts=2x4,3x"), "'3x' is not PxD"),
    "input_pipeline unknown dataset": (
        _bench("input_pipeline", "--datasets=mnist,imagenet"),
        "'imagenet' is not one of",
    ),
    "epoch_time missing data": (
        _bench("epoch_time", "--data_dir=/nonexistent/data"),
        "missing dataset /nonexistent/data/mnist/arrays",
    ),
    "population bad member count": (
        _bench("population", "--members=4,x"),
        "'x' is not a positive integer",
    ),
    "population bad placement": (
        _bench("population", "--placements=2,0"),
        "'0' is not a positive integer",
    ),
    "population missing data": (  # the first solo run's own process says it
        _bench("population", "--target", "--data_dir=/nonexistent/data"),
        "nodepert_dist.train --lr=0.005: missing dataset /nonexistent/data/mnist/arrays",
    ),
    "population missing data in process": (
        _bench("population", "--target", "--solo=in_process", "--data_dir=/nonexistent/data"),
        "missing dataset /nonexistent/data/mnist/arrays",
    ),
    "population unknown solo mode": (
        _bench("population", "--target", "--solo=threads"),
        "--solo",
    ),
    "gpu_suite unknown network": (
        _bench("gpu_suite", "--networks=fc,bogus"),
        "'bogus' is not one of",
    ),
    "gpu_suite bad budget": (_bench("gpu_suite", "--budget_s=0"), "must be positive, got 0"),
    "gpu_suite unknown section": (
        _bench("gpu_suite", "--sections=precision,peaks"),
        "unknown section 'peaks'; sections: precision, loop, steps, noise, population",
    ),
    "loop_overhead unknown loop": (
        _bench("loop_overhead", "--loops=after,bogus"),
        "'bogus' is not one of before, after, k4, k16, device, device_k16",
    ),
    "bf16_sigma unknown network": (
        _bench("bf16_sigma", "--networks=fc,bogus"),
        "'bogus' is not one of",
    ),
    "checkpoint_overhead unknown network": (
        _bench("checkpoint_overhead", "--network=bogus"),
        "invalid choice: 'bogus'",
    ),
    "compile_time unknown network": (
        _bench("compile_time", "--networks=fc,bogus"),
        "'bogus' is not one of fc, linfc, conv",
    ),
}


def test_every_entry_point_has_a_case():
    commands = [" ".join(c) for c, _ in CASES.values()]
    assert set(CONSOLE_SCRIPTS) == {"nodepert-train", "nodepert-plot", "nodepert-experiment"}
    for name in CONSOLE_SCRIPTS:
        assert any(f"sys.argv[0] = {name!r}" in c for c in commands), name
    scripts = [p for p in (REPO / "benchmarks").glob("*.py") if "__main__" in p.read_text()]
    assert len(scripts) == 10
    for script in scripts:
        assert any(f" {script} " in c + " " for c in commands), script


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_no_traceback(tmp_path, case):
    cmd, message = CASES[case]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path
    )  # cwd: nothing the command writes lands in the repo
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), text[-3000:]
    assert message in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []
