"""The code keeps the project's lint and format rules (ruff.toml): `ruff format .` and
`ruff check --fix .` repair most of what this finds."""

import subprocess
import sys

from conftest import REPO

RUFF = [sys.executable, "-m", "ruff"]


def test_ruff_check_passes():
    out = subprocess.run(
        [*RUFF, "check", "--output-format=concise", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_ruff_format_changes_nothing():
    out = subprocess.run(
        [*RUFF, "format", "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
