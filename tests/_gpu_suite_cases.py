"""benchmarks/gpu_suite.py's bookkeeping, as plain functions that tests/test_benchmarks.py runs
each in a fresh process: gpu_suite imports throughput.py, whose absl flags clash with the
trainer's, which other test files have already defined in a pytest worker."""

import json
import pathlib
import subprocess
import tempfile

import gpu_suite
import gpu_suite_children
import pytest
from gpu_suite_table import table


def section_error_is_a_row_and_the_next_section_runs():
    """On a short GPU loan one failing section (an API the device's jax lacks, out of memory)
    must not lose the rest: it becomes a `skipped` row naming the error, the table lists it."""

    rows = []

    def emit(section, row):
        rows.append(dict(section=section, device_kind="cpu", date="d", quick=True, **row))

    def broken():
        raise ValueError("no such API\nsecond line")

    assert gpu_suite.run_section(emit, "precision", broken) is None
    assert gpu_suite.run_section(emit, "loop", lambda: 7) == 7
    assert rows == [
        dict(
            section="precision",
            device_kind="cpu",
            date="d",
            quick=True,
            skipped="error: ValueError: no such API",
        )
    ]
    assert "Not measured: precision (error: ValueError: no such API)." in table(rows, "cmd")


def population_stops_at_the_first_size_over_budget():
    """Seen on an H200: N=4 did not fit, yet N=16 ran because a skipped size reset the
    estimate. Sizes grow, so the first that does not fit ends the section."""

    ran, rows = [], []

    def fake_run(cmd, **kw):
        members = int(next(a for a in cmd if a.startswith("--members=")).split("=")[1])
        ran.append(members)
        out = next(a for a in cmd if a.startswith("--out=")).split("=", 1)[1]
        with open(out, "a") as f:
            f.write(json.dumps(dict(members=members, step_ms=1.0)) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    clock = [0.0]  # each run takes 1 s; 2 s are left: N=1 (estimated 1 s) fits, N=4 (3 s) not
    gpu_suite_children.time.perf_counter = lambda: clock[0]
    real_run = fake_run

    def fake_run(cmd, **kw):  # noqa: F811 (the same run, taking 1 s of the fake clock)
        clock[0] += 1.0
        return real_run(cmd, **kw)

    class Budget:
        def fits(self, est):
            return est <= 2.0

    gpu_suite_children.subprocess.run = fake_run
    tmp_path = pathlib.Path(tempfile.mkdtemp())
    args = gpu_suite.parse_args([f"--out={tmp_path / 'p.jsonl'}"])
    gpu_suite_children.population_section(args, Budget(), lambda s, r: rows.append(r))
    assert ran == [1]
    assert [(r["members"], r.get("skipped")) for r in rows] == [
        (1, None),
        (4, "over the section's budget"),
        (16, "over the section's budget"),
        (64, "over the section's budget"),
    ]


def sections_share_the_whole_budget():
    """--sections=precision,population: the two take the budget in the suite's order, with the
    shares of the whole suite scaled up (5% slack kept)."""

    whole = gpu_suite.deadlines(0.0, 100.0)
    assert whole["population"].end == pytest.approx(95.0)
    two = gpu_suite.deadlines(0.0, 100.0, ["precision", "population"])
    assert list(two) == ["precision", "population"]
    assert two["precision"].end == pytest.approx(95.0 * 0.10 / 0.25)
    assert two["population"].end == pytest.approx(95.0)
    assert gpu_suite.parse_args(["--sections=population,precision"]).sections == [
        "population",
        "precision",
    ]


def loop_stops_at_the_first_batch_over_budget():
    """The population section's fault, in its sibling: a skipped batch size must not reset the
    loop section's estimate (each run takes 3 s of a fake clock; 2 s are left after the first)."""
    ran, rows, clock = [], [], [0.0]

    def fake_run(cmd, **kw):
        clock[0] += 3.0
        b = int(next(a for a in cmd if a.startswith("--batchsizes=")).split("=")[1])
        ran.append(b)
        out = next(a for a in cmd if a.startswith("--out=")).split("=", 1)[1]
        with open(out, "a") as f:
            f.write(json.dumps(dict(batchsize=b, loop="after")) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    class Budget:
        end = 100.0

        def fits(self, est):
            return est <= 2.0

    gpu_suite_children.time.perf_counter = lambda: clock[0]
    gpu_suite_children.subprocess.run = fake_run
    tmp_path = pathlib.Path(tempfile.mkdtemp())
    args = gpu_suite.parse_args([f"--out={tmp_path / 'l.jsonl'}", "--batchsizes=128,1024,4096"])
    gpu_suite_children.loop_section(args, Budget(), lambda s, r: rows.append(r))
    assert ran == [128]
    assert {r["batchsize"] for r in rows if "skipped" in r} == {1024, 4096}
