"""The throughput benchmark's smoke run: every variant timed, ratios consistent, chart drawn."""

import json
import os
import subprocess
import sys

import pytest
from conftest import subprocess_env

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHED = subprocess_env()


def _quick_rows(script, out, *args, env=None):
    """(the JSON rows a benchmark's --quick run wrote to `out`, its stdout); it must exit 0.
    env=CACHED: the worker's persistent compilation cache (conftest.XLA_CACHE), for every run
    but compile_time.py's (it times compiling): a step compiled for its costs is found there
    when it is run, and population.py --quick, run alone and as the GPU suite's population
    section, compiles once."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", script),
            "--quick",
            f"--out={out}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stdout


def test_throughput_quick_run(tmp_path):
    out, png = tmp_path / "t.jsonl", tmp_path / "t.png"
    rows, stdout = _quick_rows("throughput.py", out, "--devices=2", f"--png={png}", env=CACHED)
    assert {(r["variant"], r["devices"]) for r in rows} == {
        (v, 2) for v in ("sgd", "np-rademacher", "naive", "original")
    }
    for d in (2,):  # 2 devices: the per-device columns and a multi-device mesh
        by = {r["variant"]: r for r in rows if r["devices"] == d}
        for v in ("np-rademacher", "naive", "original"):
            assert abs(by[v]["time_vs_sgd"] - by[v]["step_ms"] / by["sgd"]["step_ms"]) < 1e-9
            assert by[v]["temp_mb"] > 0 and by[v]["gflop_per_step_per_device"] > 0
        ex_s, ms = by["np-rademacher"]["examples_per_s"], by["np-rademacher"]["step_ms"]
        assert ex_s * ms / 1e3 == pytest.approx(128)
        # NP's matmul FLOPs equal SGD's (the first layer is computed once for clean and noisy).
        assert (
            by["np-rademacher"]["gflop_per_step_per_device"]
            < 1.03 * by["sgd"]["gflop_per_step_per_device"]
        )
    assert "np-rademacher" in stdout and png.stat().st_size > 10_000


def test_compile_time_quick_run(tmp_path):
    rows, stdout = _quick_rows("compile_time.py", tmp_path / "c.jsonl")
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"sgd", "np"} and "total_vs_sgd" in by["np"]
    for r in rows:
        stages = r["trace_s"] + r["lower_s"] + r["compile_s"]
        assert stages == pytest.approx(r["total_s"]) and min(r["trace_s"], r["compile_s"]) > 0
        assert r["jaxpr_eqns"] > 0 and r["hlo_ops"] > 0 and r["temp_mb"] > 0
        assert r["init_cpu_s"] > 0  # the start-up initialisation is timed too
    assert by["np"]["total_vs_sgd"] == pytest.approx(by["np"]["total_s"] / by["sgd"]["total_s"])
    assert "np" in stdout


def test_naive_reference_is_the_same_unbiased_np():
    """The naive reference computes this engine's Gaussian NP update the straightforward way:
    same keys, same update (so NP/naive compares implementations, not estimators). The engine
    draws with non-partitionable threefry (faster here); so does naive inside this test."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import references

    from nodepert_dist import models
    from nodepert_dist import step as step_lib
    from nodepert_dist.estimator import NPSettings

    model = models.build_model("conv", 10)
    x = jax.random.normal(jax.random.key(0), (16, 12, 12, 1))
    y = jnp.arange(16) % 10
    params = model.init(jax.random.key(1), x[:1])["params"]
    common = dict(loss="mse", sigma=1e-3, seed=0, global_batch=16)
    ours = step_lib.local_gradient(
        update_rule="np",
        loss="mse",
        seed=0,
        global_batch=16,
        np=NPSettings(sigma=1e-3, noise="gaussian"),
    )
    naive = references.naive_np(**common)
    args = (params, x, y, jnp.int32(4), jnp.arange(16))
    with jax.threefry_partitionable(False):
        (g1, l1, _), (g2, l2, _) = [
            jax.jit(lambda *a, f=f: f(model, *a))(*args) for f in (ours, naive)
        ]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3 * float(jnp.abs(a).max()))


def test_population_quick_run(tmp_path):
    """benchmarks/population.py --quick: a row per population size with consistent ratios and
    the memory per member from XLA's analysis, into a results folder that does not exist yet
    (a fresh clone has no benchmarks/results/)."""
    rows, _ = _quick_rows("population.py", tmp_path / "results" / "p.jsonl", env=CACHED)
    assert [(r["network"], r["rule"], r["members"]) for r in rows] == [
        ("fc", "np", 1),
        ("fc", "np", 2),
    ]
    for r in rows:
        n = r["members"]
        assert r["speedup_vs_sequential"] == pytest.approx(n * r["solo_step_ms"] / r["step_ms"])
        assert r["examples_per_s_per_member"] * r["step_ms"] / 1e3 == pytest.approx(100)
        assert 0 < r["mb_per_member"] and 0 < r["solo_mb"]
    # two members' state and temporaries cost less than twice one member's whole step
    assert rows[1]["mb_per_member"] < rows[1]["solo_mb"]


def test_population_placement_quick_run(tmp_path):
    """--placements: one population's step per --member_devices on all devices; spread over 4
    groups, a device holds a quarter of the members (less memory per device)."""
    rows, stdout = _quick_rows(
        "population.py",
        tmp_path / "p.jsonl",
        "--cpu_devices=4",
        "--networks=fc",
        "--rules=np",
        "--members=4",
        "--placements=1,4",
        "--batchsize=32",
        env=CACHED,
    )
    assert [(r["members"], r["member_devices"], r["devices"]) for r in rows] == [
        (4, 1, 4),
        (4, 4, 4),
    ]
    for r in rows:
        assert r["examples_per_s_per_member"] * r["step_ms"] / 1e3 == pytest.approx(32)
    assert rows[1]["speedup_vs_member_devices_1"] == pytest.approx(
        rows[0]["step_ms"] / rows[1]["step_ms"]
    )
    assert rows[1]["mb_per_device"] < rows[0]["mb_per_device"]
    assert "member_devices=4" in stdout


def _gpu_suite(tmp_path, *args):
    table = tmp_path / "s.md"
    rows, _ = _quick_rows(
        "gpu_suite.py", tmp_path / "s.jsonl", *args, f"--table={table}", env=CACHED
    )
    return rows, table.read_text()


def test_gpu_suite_quick_run_measures_every_section(tmp_path):
    rows, table = _gpu_suite(tmp_path)
    assert [r["section"] for r in rows if "skipped" in r] == []
    assert {r["section"] for r in rows} == {
        "precision",
        "peak",
        "loop",
        "steps",
        "noise",
        "population",
    }
    steps = {(r["network"], r["dtype"], r["variant"]): r for r in rows if r["section"] == "steps"}
    assert set(steps) == {
        (n, d, v)
        for n in ("fc", "conv")
        for d in ("float32", "bfloat16")
        for v in ("sgd", "np-rademacher")
    }
    peaks = {r["dtype"]: r["gflop_s"] for r in rows if r["section"] == "peak"}
    for r in steps.values():
        assert r["temp_mb"] > 0 and r["gflop_per_step"] > 0 and r["batchsize"] == 8
        assert r["mfu"] == pytest.approx(
            r["gflop_per_step"] / (r["step_ms"] / 1e3) / peaks[r["dtype"]]
        )
    assert {r["variant"] for r in rows if r["section"] == "noise"} == {
        "np-rademacher",
        "np-gaussian",
    }
    # On a CPU default precision is float32: the TF32 check compares two equal estimates.
    (prec,) = [r for r in rows if r["section"] == "precision"]
    assert prec["ok"] and prec["min_cosine"] > 0.9999
    # The table is labelled with this device and date, one row per measured combination.
    kind, date = rows[0]["device_kind"], rows[0]["date"]
    assert kind == "cpu" and table.startswith(f"### GPU suite: {kind}, {date}")
    assert "| conv | bfloat16 | 8 |" in table and "| fc | 8 |" in table
    loops = [r for r in rows if r["section"] == "loop"]  # benchmarks/loop_overhead.py's split
    assert [r["loop"] for r in loops] == ["before", "after", "k4"]
    for r in loops:
        assert r["trainer_epoch_s"] > 0 and r["pure_epoch_s"] > 0 and r["steps_per_epoch"] == 100
        assert r["overhead"] == pytest.approx(r["trainer_epoch_s"] / r["pure_epoch_s"] - 1)
    assert "| 8 | after |" in table and "| 8 | k4 |" in table
    population = [r for r in rows if r["section"] == "population"]
    assert [r["members"] for r in population] == [1, 2]
    for r in population:
        assert r["speedup_vs_sequential"] == pytest.approx(
            r["members"] * r["solo_step_ms"] / r["step_ms"]
        )
        assert r["mb_per_member"] > 0
    assert "| 2 | 100 |" in table  # population.py --quick's batch


def test_gpu_suite_records_what_its_budget_drops(tmp_path):
    rows, table = _gpu_suite(tmp_path, "--budget_s=0.001")
    skipped = {r["section"] for r in rows if "skipped" in r}
    assert skipped == {"precision", "loop", "steps", "noise", "population"}
    assert {r["section"] for r in rows if "skipped" not in r} == {"peak"}
    assert "Not measured: precision fc 0.003 (over the section's budget)" in table
    assert "loop fc 8 before (over the section's budget)" in table


@pytest.mark.parametrize(
    "case",
    [
        "section_error_is_a_row_and_the_next_section_runs",
        "population_stops_at_the_first_size_over_budget",
        "sections_share_the_whole_budget",
        "loop_stops_at_the_first_batch_over_budget",
    ],
)
def test_gpu_suite_bookkeeping(case):
    """tests/_gpu_suite_cases.py, each case in its own process (see its docstring)."""
    code = f"import _gpu_suite_cases as c; c.{case}()"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks"), ROOT]
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
