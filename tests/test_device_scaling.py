"""benchmarks/device_scaling.py: a smoke run; every point measured, efficiencies consistent, chart."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips


def test_device_scaling_quick_run(tmp_path, mnist_dir):
    out, png = tmp_path / "s.jsonl", tmp_path / "s.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "device_scaling.py"),
            "--quick",
            f"--data_dir={mnist_dir}",
            f"--out={out}",
            f"--png={png}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [
        (r["mode"], r["processes"], r["devices_per_process"], r["batchsize"]) for r in rows
    ] == [
        ("strong", 1, 1, 400),
        ("strong", 1, 2, 400),
        ("weak", 1, 1, 400),
        ("weak", 1, 2, 800),
        ("layout", 1, 2, 400),
        ("layout", 2, 1, 400),
    ]
    assert all(r["examples_per_s"] > 0 for r in rows)
    for mode in ("strong", "weak"):
        one, two = [r for r in rows if r["mode"] == mode]
        assert one["efficiency"] == 1.0
        assert two["efficiency"] == pytest.approx(
            two["examples_per_s"] / (2 * one["examples_per_s"])
        )
    assert rows[-1]["vs_one_process"] == pytest.approx(
        rows[-1]["examples_per_s"] / rows[-2]["examples_per_s"]
    )
    assert "efficiency" in proc.stdout and png.stat().st_size > 10_000
