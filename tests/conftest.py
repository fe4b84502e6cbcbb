"""Shared test set-up: 8 simulated CPU devices, where the real MNIST lives, and how tests start
commands (`run_command`, `train_command`, `free_port`).

`.ci/run` fetches MNIST into ./data; set NODEPERT_DATA_DIR to use another place.
"""

import atexit
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from nodepert_dist.mesh import simulate_cpu_devices

# Before any backend starts: every in-process test sees 8 CPU devices.
simulate_cpu_devices(8)

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("NODEPERT_DATA_DIR", str(REPO / "data"))


@pytest.fixture(scope="session")
def mnist_dir():
    """The data_dir holding fetched MNIST; fails (never skips) when it is missing."""
    from nodepert_dist.data import DataError, open_dataset

    try:
        open_dataset("mnist", DATA_DIR)  # converts the fetched files once, if not yet done
    except DataError as e:
        pytest.fail(f"{e} (CI fetches it in .ci/run)")
    return DATA_DIR


# ----------------------------------------------------------------------------- subprocesses

# The commands a pytest worker starts share one persistent XLA compilation cache: the same small
# programs compile once per worker instead of once per command (a cache hit runs the same
# executable a compile would give). A test may set its own JAX_COMPILATION_CACHE_DIR.
XLA_CACHE = tempfile.mkdtemp(prefix="nodepert-test-xla-cache-")
atexit.register(shutil.rmtree, XLA_CACHE, True)


def subprocess_env(**extra) -> dict:
    """The environment of a command a test starts: this checkout first on PYTHONPATH, and none
    of the cluster variables or XLA flags of the shell the suite runs in."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in (
        "NODEPERT_COORDINATOR_ADDRESS",
        "NODEPERT_NUM_PROCESSES",
        "NODEPERT_PROCESS_ID",
        "XLA_FLAGS",
    ):
        env.pop(k, None)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    env.update(extra)
    return env


def run_command(cmd, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    """Runs `cmd` from the repository root; its output captured as text."""
    return subprocess.run(
        cmd,
        env=subprocess_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def train_command(args, devices=8, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    """`nodepert-train` on `devices` simulated CPU devices (0: as the environment says)."""
    cmd = [sys.executable, "-m", "nodepert_dist.train", *args]
    if devices:
        cmd.insert(3, f"--cpu_devices={devices}")
    return run_command(cmd, timeout, **extra_env)


def free_port() -> int:
    """A TCP port on loopback that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
