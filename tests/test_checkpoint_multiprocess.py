"""Checkpoints across 2 processes (x 2 CPU devices): one restore step for all, and a failure on
one process ends every process with a clear line instead of a hang."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, subprocess_env

from nodepert_dist import checkpoint_faults, checkpoint_layout

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

TIMEOUT_S = 120

# Saves steps 1..N (unless told not to), then restores and prints what it got.
_WORKER = """
import sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

pid, port, directory, saves = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from nodepert_dist import checkpoint, checkpoint_faults, checkpoint_layout, checkpoint_restore
from nodepert_dist import mesh as mesh_lib

checkpoint_faults.enable_from_env()  # the test's NODEPERT_CKPT_TEST_* variables

mesh = mesh_lib.make_mesh()
def tree(value):
    return {"w": jax.make_array_from_callback((8, 3), NamedSharding(mesh, P(mesh_lib.DATA)),
                                              lambda idx: np.full((8, 3), value, np.float32)[idx])}
try:
    saver = checkpoint.Checkpointer(directory, keep=0, commit_timeout_s=60)
    for step in range(1, saves + 1):
        saver.save(step, tree(step), meta={"loop": {}})
    saver.wait()
    print("LISTING", pid, checkpoint_layout.committed_steps(directory), flush=True)
    restored, manifest = checkpoint_restore.restore(directory, tree(0))
    value = float(np.asarray(restored["w"].addressable_shards[0].data)[0, 0])
    print("RESTORED", pid, manifest["step"], value, flush=True)
except checkpoint_layout.CheckpointError as e:
    print(f"error: {e}", flush=True)
    sys.exit(1)
"""


def _two_processes(directory, saves, env_of):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(i), str(port), str(directory), str(saves)],
            env=subprocess_env(**env_of(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
        for i in range(2)
    ]
    outs, start = [], time.monotonic()
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return [p.returncode for p in procs], outs, time.monotonic() - start


def _line(out, prefix):
    return next(l for l in out.splitlines() if l.startswith(prefix))


def test_processes_with_different_listings_restore_the_step_process_0_chose(tmp_path):
    # Process 1's listing misses the newest step (a stale shared-file-system cache).
    rcs, outs, _ = _two_processes(tmp_path, 3, lambda i: {checkpoint_faults.HIDE_ENV: "1"})
    assert rcs == [0, 0], outs
    assert _line(outs[0], "LISTING") == "LISTING 0 [1, 2, 3]"
    assert _line(outs[1], "LISTING") == "LISTING 1 [1, 2]"  # it would have restored step 2
    assert _line(outs[0], "RESTORED") == "RESTORED 0 3 3.0"
    assert _line(outs[1], "RESTORED") == "RESTORED 1 3 3.0"


INJECTED = "OSError: [Errno 5] Input/output error (injected by NODEPERT_CKPT_TEST_FAIL)"


@pytest.mark.parametrize(
    "failing, expected",
    [
        (
            1,
            [
                "error: saving checkpoint step 2 failed on process 0: process 1 failed to write step 2: "
                + INJECTED,
                "error: saving checkpoint step 2 failed on process 1: " + INJECTED,
            ],
        ),
        (
            0,
            [
                "error: saving checkpoint step 2 failed on process 0: " + INJECTED,
                "error: saving checkpoint step 2 failed: process 0: " + INJECTED,
            ],
        ),
    ],
)
def test_a_write_failure_on_one_process_ends_both_with_one_line(tmp_path, failing, expected):
    rcs, outs, elapsed = _two_processes(
        tmp_path, 3, lambda i: {checkpoint_faults.FAIL_ENV: f"{failing}@2"}
    )
    assert rcs == [1, 1], outs
    assert elapsed < 90  # within the commit timeout (60 s), not a hang
    errors = [[l for l in out.splitlines() if l.startswith("error:")] for out in outs]
    assert errors == [[expected[0]], [expected[1]]], outs
    assert checkpoint_layout.committed_steps(str(tmp_path)) == [1]
    assert "Traceback" not in outs[0] + outs[1]
