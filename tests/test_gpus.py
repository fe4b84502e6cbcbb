"""Local launchers give each child its own GPUs: a faked machine (a fake nvidia-smi on PATH, or
CUDA_VISIBLE_DEVICES), the assignment rule, and launch/local.py and the sweep's local runs."""

import os
import sys

import pytest
from conftest import REPO, run_command

from nodepert_dist import gpus, sweep_launch

LISTING = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i}aaa)\n" for i in range(4))
PRINT_ENV = [
    "sh",
    "-c",
    'echo "gpus=${CUDA_VISIBLE_DEVICES-unset} mem=${XLA_PYTHON_CLIENT_MEM_FRACTION-unset} '
    'platforms=${JAX_PLATFORMS-unset}"',
]


@pytest.fixture
def fake_smi(tmp_path):
    """A PATH whose nvidia-smi lists 4 GPUs."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && printf '{LISTING}'\n")
    tool.chmod(0o755)
    return f"{tool.parent}{os.pathsep}{os.environ['PATH']}"


def test_machine_gpus_from_nvidia_smi_or_the_environment(fake_smi):
    assert gpus.machine_gpus({"PATH": fake_smi}) == ["0", "1", "2", "3"]
    assert gpus.machine_gpus({"PATH": fake_smi, "CUDA_VISIBLE_DEVICES": "5,7"}) == ["5", "7"]
    assert gpus.machine_gpus({"PATH": fake_smi, "JAX_PLATFORMS": "cpu"}) == []
    assert gpus.machine_gpus({"PATH": fake_smi, "JAX_PLATFORMS": "cuda,cpu"}) == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert gpus.machine_gpus({"PATH": "/nonexistent"}) == []
    assert gpus.machine_gpus({"PATH": fake_smi, "CUDA_VISIBLE_DEVICES": ""}) == []


def test_children_get_their_own_gpus_round_robin():
    four = ["0", "1", "2", "3"]
    assert [gpus.child_env(s, 2, four) for s in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert [gpus.child_env(s, 4, four)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == four
    # More children than GPUs: round robin, each with its share of the memory.
    six = [gpus.child_env(s, 6, four) for s in range(6)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in six] == ["0", "1", "2", "3", "0", "1"]
    assert {e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in six} == {"0.45"}
    assert gpus.child_env(1, 2, four, per_child=1) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert gpus.child_env(0, 3, []) == {}
    # A fraction the user chose is theirs.
    env = gpus.with_child_env({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"}, six[0])
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2" and env["CUDA_VISIBLE_DEVICES"] == "0"


def _local(fake_smi, *args):
    r = run_command(
        [sys.executable, str(REPO / "launch" / "local.py"), *args, "--", *PRINT_ENV],
        timeout=60,
        PATH=fake_smi,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(
        line for line in r.stdout.splitlines() if line.startswith("[") and "] gpus=" in line
    )


@pytest.mark.slow  # subprocesses
def test_local_launcher_gives_each_rank_its_gpus(fake_smi, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert _local(fake_smi, "--num_processes=2") == [
        "[0] gpus=0,1 mem=unset platforms=unset",
        "[1] gpus=2,3 mem=unset platforms=unset",
    ]
    assert _local(fake_smi, "--num_processes=2", "--devices_per_process=1") == [
        "[0] gpus=0 mem=unset platforms=unset",
        "[1] gpus=1 mem=unset platforms=unset",
    ]
    # The CPU path is unchanged: simulated devices, the CPU platform, no GPU assignment.
    assert _local(fake_smi, "--num_processes=2", "--devices_per_process=2", "--platform=cpu") == [
        "[0] gpus=unset mem=unset platforms=cpu",
        "[1] gpus=unset mem=unset platforms=cpu",
    ]


@pytest.mark.slow  # subprocesses
def test_local_launcher_gpu_platform_without_gpus_is_one_line(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    r = run_command(
        [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=1", "--platform=gpu"]
        + ["--", "true"],
        timeout=60,
        PATH="/usr/bin:/bin",
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no GPU" in r.stderr


@pytest.mark.slow  # subprocesses
def test_sweep_local_runs_use_their_slots_gpus(fake_smi, tmp_path, monkeypatch):
    """--parallel=2 on 4 GPUs: two at a time, two GPUs each; a later row takes a freed slot's."""
    monkeypatch.setenv("PATH", fake_smi)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    runs = [
        {"index": i, "argv": PRINT_ENV, "workdir": str(tmp_path / f"run{i}"), "flags": {}}
        for i in range(3)
    ]
    assert sweep_launch.run_local(runs, 2, skip_finished=False, log=lambda _: None) == 0
    seen = [(tmp_path / f"run{i}" / "run.log").read_text().split()[0] for i in range(3)]
    assert seen[:2] == ["gpus=0,1", "gpus=2,3"] and seen[2] in seen[:2]


@pytest.mark.slow  # subprocesses
def test_slurm_scripts_set_the_gpu_diagnostics_by_names_xla_knows(tmp_path):
    """Both templates and the sweep's job array export the same NCCL/XLA settings, and this
    jaxlib's XLA (the same flag table as its CUDA plugin's) starts with them: an unknown XLA
    flag aborts every process at start-up."""
    runs = [{"index": 0, "argv": ["true"], "workdir": str(tmp_path / "r"), "flags": {}}]
    for text in [
        (REPO / "launch" / "slurm" / name).read_text()
        for name in ("multinode.sbatch", "singlenode.sbatch")
    ] + [sweep_launch.slurm_script(runs, {}, "spec.json")]:
        assert sweep_launch.GPU_ENV in text
    flags = run_command(["bash", "-c", sweep_launch.GPU_ENV + 'echo "$NCCL_DEBUG|$XLA_FLAGS"'])
    nccl, xla = flags.stdout.strip().split("|")
    assert nccl == "WARN" and xla.count("--xla_gpu_") == 3
    from nodepert_dist import mesh as mesh_lib

    determinism = f"{mesh_lib.DETERMINISTIC_FLAG} {mesh_lib.AUTOTUNE_CACHE_FLAG}={tmp_path}"
    r = run_command(
        [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
        XLA_FLAGS=f"{xla} {determinism}",  # and --deterministic's flags
    )
    assert r.returncode == 0, r.stderr[-2000:]
    bad = run_command(
        [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
        XLA_FLAGS=xla.replace("terminate_timeout=", "terminate_timeout_seconds="),
    )
    assert bad.returncode != 0  # the check can fail: the _seconds spelling is unknown


def test_require_gpu_is_one_line_without_a_gpu(monkeypatch):
    import jax

    from nodepert_dist import distributed

    with pytest.raises(distributed.DistributedError) as e:
        distributed.initialize(require_gpu=True, env={})
    assert "\n" not in str(e.value) and "--require_gpu" in str(e.value)
    assert "'.[cuda12]'" in str(e.value)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    distributed.initialize(require_gpu=True, env={})


def test_cuda12_extra_pins_the_jax_this_project_tests():
    import importlib.metadata
    import re

    pins = re.findall(r'"jax\[cuda12\]==([0-9.]+)"', (REPO / "setup.py").read_text())
    assert pins == [importlib.metadata.version("jax")]


def test_reproducible_compilation_sets_xla_flags_and_the_shared_cache(monkeypatch, tmp_path):
    import jax

    from nodepert_dist import mesh as mesh_lib

    monkeypatch.setenv("XLA_FLAGS", "--xla_mine=1")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {n: getattr(jax.config, n) for n in names}
    try:
        for _ in range(2):  # a second call adds nothing
            mesh_lib.reproducible_compilation(True, str(tmp_path))
            assert os.environ["XLA_FLAGS"].split() == [
                "--xla_mine=1",
                mesh_lib.DETERMINISTIC_FLAG,
                f"{mesh_lib.AUTOTUNE_CACHE_FLAG}={tmp_path / 'autotune'}",
            ]
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    finally:
        for n, v in before.items():
            jax.config.update(n, v)
    monkeypatch.setenv("XLA_FLAGS", "")
    mesh_lib.reproducible_compilation(False, "")
    assert os.environ["XLA_FLAGS"] == ""
