"""Multi-process runs on localhost through launch/local.py (CPU, gloo, every call with a timeout).

2 processes x 4 simulated devices must train exactly what 1 process x 8 devices trains (same
global batch and seed); a dead rank or an absent coordinator must end the job quickly.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO, free_port, run_command, subprocess_env

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

LAUNCH = str(REPO / "launch" / "local.py")
WORKER = str(REPO / "tests" / "_dist_worker.py")
PY = sys.executable
# Small and quick: 7 steps of 8000 examples (fc 784-32-10).
SMALL = ["--hl_size=32", "--n_hl=1", "--batchsize=8000", "--num_epochs=1", "--eval_batchsize=2000"]


env = subprocess_env
run = run_command


def rows_by_rank(stdout, tag="ROWS"):
    rows = {}
    for line in stdout.splitlines():
        if f"{tag} " in line:
            rank, payload = line.split(f"{tag} ", 1)[1].split(" ", 1)
            rows[int(rank)] = json.loads(payload)
    return rows


# Tolerances: the only difference between the layouts is the order of the cross-device sums
# (XLA's in-process all-reduce vs gloo). SGD: parameters within 1e-7 (measured: 1 ulp, 7e-9),
# losses within 1e-6 relative, accuracies within 2 examples (measured: identical). NP divides
# loss differences by sigma=1e-4, so rounding is amplified: parameters within 2e-6 (measured 5e-7 after 7 steps, while training
# moves them by > 1e-3), losses within 1e-5 relative, and accuracies within 3 examples
# (measured: 1 of 60000 flipped).
@pytest.mark.parametrize(
    "rule, atol, loss_rel, acc_abs", [("sgd", 1e-7, 1e-6, 2 / 10000), ("np", 2e-6, 1e-5, 3 / 10000)]
)
def test_two_processes_train_like_one(mnist_dir, tmp_path, rule, atol, loss_rel, acc_abs):
    common = SMALL + [f"--update_rule={rule}", f"--data_dir={mnist_dir}"]
    multi = run(
        [
            PY,
            LAUNCH,
            "--num_processes=2",
            "--devices_per_process=4",
            "--timeout_s=150",
            "--",
            PY,
            WORKER,
            *common,
            f"--workdir={tmp_path}/m",
            f"--save_final_params={tmp_path}/m.npz",
        ],
        timeout=180,
    )
    assert multi.returncode == 0, multi.stdout[-3000:]
    single = run(
        [
            PY,
            WORKER,
            "--cpu_devices=8",
            *common,
            f"--workdir={tmp_path}/s",
            f"--save_final_params={tmp_path}/s.npz",
        ],
        timeout=120,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    timing = {"epoch_time", "examples_per_s"}  # each process's own clock
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    ranks = rows_by_rank(multi.stdout)
    assert sorted(ranks) == [0, 1]
    # Across processes the step's sums go as one flat float32 buffer (allreduce.py): the
    # gradients (784*32 + 32 + 32*10 + 10) and the 3 metrics; one process keeps XLA's tuple.
    flat = [["f32[25453]"]]
    assert rows_by_rank(multi.stdout, "ALLREDUCE") == {0: flat, 1: flat}
    assert len(rows_by_rank(single.stdout, "ALLREDUCE")[0][0]) == 7
    assert untimed(ranks[0]) == untimed(ranks[1]), "the two processes disagree on a metric"
    # Only process 0 wrote the metrics file: one row per epoch, not two.
    written = [json.loads(l) for l in open(tmp_path / "m" / "metrics.jsonl")]
    assert [r["epoch"] for r in written] == [0, 1]
    assert written == ranks[0]

    one = rows_by_rank(single.stdout)[0]
    for a, b in zip(ranks[0], one):
        assert a.keys() == b.keys()
        for k in a.keys() - timing:
            tol = dict(rel=1e-6, abs=acc_abs) if k.endswith("acc") else dict(rel=loss_rel, abs=0)
            assert a[k] == pytest.approx(b[k], **tol), (k, a[k], b[k])
    assert one[-1]["step"] == 7 and one[-1]["test_loss"] < one[0]["test_loss"]

    p_multi, p_single = np.load(tmp_path / "m.npz"), np.load(tmp_path / "s.npz")
    assert sorted(p_multi) == sorted(p_single) and len(p_multi) == 4
    for k in p_single:
        np.testing.assert_allclose(p_multi[k], p_single[k], rtol=0, atol=atol, err_msg=k)
    # The tolerance is far below how far training moved the parameters.
    init = _init_params(mnist_dir)
    moved = max(
        float(np.abs(p_single[k] - init[k.split(".")[0]][k.split(".")[1]]).max()) for k in p_single
    )
    assert moved > 100 * atol, moved


def _init_params(mnist_dir):
    """The untrained parameters of the SMALL net (seed 0), to show training moved them."""
    import jax

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import models, optim
    from nodepert_dist import step as step_lib

    model = models.build_model("fc", 10, 1, 32)
    state = step_lib.init_state(
        model,
        optim.make_optimizer("sgd", 1e-2, 0.0),
        np.zeros((1, 28, 28, 1), np.float32),
        0,
        mesh_lib.make_mesh(jax.devices()[:1]),
    )
    return jax.device_get(state.params)


class Output:
    """Collects a process's output lines in a thread, so the test can wait for one of them."""

    def __init__(self, proc):
        self.lines, self.proc = [], proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((l for l in self.lines if text in l), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.lines[-40:]))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _training_job(mnist_dir, tmp_path, *flags, timeout_s=120):
    """2 x 4-device ranks of a long training (20 epochs of 5,000 examples: still training when
    the test acts) under the launcher, in its own session; (proc, its Output, rank pids)."""
    cmd = [
        PY,
        LAUNCH,
        "--num_processes=2",
        "--devices_per_process=4",
        f"--timeout_s={timeout_s}",
        "--",
        PY,
        "-m",
        "nodepert_dist.train",
        "--hl_size=32",
        "--n_hl=1",
        "--batchsize=64",
        "--num_epochs=20",
        "--validation_size=55000",
        "--eval_train=false",
        *flags,
        f"--data_dir={mnist_dir}",
        f"--workdir={tmp_path}/w",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    out = Output(proc)
    try:
        pids = [int(out.wait_for(f"[launch] rank {r} pid", 30).split()[-1]) for r in (0, 1)]
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, out, pids


def test_killing_one_rank_ends_the_job(mnist_dir, tmp_path):
    # Long enough (20 epochs) that it is still training when killed; short epochs (5,000
    # training examples: the rest is the validation split) so the first one ends soon.
    proc, out, pids = _training_job(mnist_dir, tmp_path)
    try:
        out.wait_for("epoch 1 [", 90)  # rank 0 reports training progress
        start = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0
    reason = out.wait_for("[launch] error:", 5)
    assert "rank 1 was killed by SIGKILL" in reason, reason
    assert elapsed < 30
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "a rank outlived the launcher"


def test_a_collective_that_never_completes_ends_the_job_in_one_line(mnist_dir, tmp_path):
    """Rank 1 stopped (SIGSTOP: alive, so no heartbeat or launcher notices) mid-training: rank
    0 waits in a collective forever. Its step watchdog (--hang_timeout_s) ends it with one line
    and exit 4, and the launcher then takes the job down."""
    proc, out, pids = _training_job(
        mnist_dir, tmp_path, "--metrics_every=1", "--hang_timeout_s=8", timeout_s=150
    )
    try:
        out.wait_for("epoch 1 [", 90)  # training: the watchdogs are armed
        assert not any("no training step finished" in line for line in out.lines)
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        rc = proc.wait(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc != 0
    line = out.wait_for("no training step finished", 5)
    assert line.startswith("[0] error: process 0/2: no training step finished in 8 s after step")
    assert "rank 0 exited with status 4" in out.wait_for("[launch] error:", 5)
    assert 8 <= elapsed < 60


def test_launcher_names_the_failing_rank_and_prefixes_output():
    script = (
        "import os, sys; r = int(os.environ['NODEPERT_PROCESS_ID']);"
        "print('hello from', r, os.environ['NODEPERT_NUM_PROCESSES'],"
        " os.environ['XLA_FLAGS'], flush=True);"
        "import time; time.sleep(0.5 if r == 2 else 60); sys.exit(7)"
    )
    start = time.monotonic()
    res = run(
        [
            PY,
            LAUNCH,
            "--num_processes=3",
            "--devices_per_process=2",
            "--timeout_s=60",
            "--",
            PY,
            "-c",
            script,
        ],
        timeout=90,
    )
    assert res.returncode == 1
    assert time.monotonic() - start < 30
    lines = res.stdout.splitlines()
    for r in range(3):
        assert f"[{r}] hello from {r} 3 --xla_force_host_platform_device_count=2" in lines
    assert lines[-1] == "[launch] error: rank 2 exited with status 7; killed the other ranks"


def test_launcher_timeout():
    start = time.monotonic()
    res = run([PY, LAUNCH, "--num_processes=2", "--timeout_s=2", "--", "sleep", "60"], timeout=60)
    assert res.returncode == 124
    assert time.monotonic() - start < 20
    assert "timeout after 2 s with rank(s) 0, 1 still running" in res.stdout.splitlines()[-1]


def test_launcher_mistyped_command_is_one_error_line():
    res = run([PY, LAUNCH, "--num_processes=2", "--", "nodepert-trian", "--lr=0.1"], timeout=30)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == [
        "error: 'nodepert-trian' is not an executable here (not on PATH, or not executable); "
        "check the command after --"
    ]
    assert "[launch] rank" not in res.stdout  # no rank was started


def _one_of_two(process_id, address, mnist_dir, tmp_path):
    """Process `process_id` of a 2-process job whose other process never starts."""
    cmd = [
        PY,
        "-m",
        "nodepert_dist.train",
        "--init_timeout_s=4",
        *SMALL,
        f"--data_dir={mnist_dir}",
        f"--workdir={tmp_path}/w",
    ]
    return run(
        cmd,
        timeout=60,
        NODEPERT_COORDINATOR_ADDRESS=address,
        NODEPERT_NUM_PROCESSES="2",
        NODEPERT_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
    )


def test_unreachable_coordinator_is_a_clear_error(mnist_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    start = time.monotonic()
    res = _one_of_two(1, address, mnist_dir, tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert time.monotonic() - start < 40
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no coordinator answered at {address} within the init timeout")


def test_missing_peer_is_a_clear_error(mnist_dir, tmp_path):
    # Process 0 of 2 starts the coordinator; process 1 never comes.
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    res = _one_of_two(0, address, mnist_dir, tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert time.monotonic() - start < 40
    assert (
        f"error: process 0/2: not all 2 processes joined the coordinator at {address} within 4 s"
    ) in res.stderr


def test_expected_devices_mismatch_fails_at_start(mnist_dir, tmp_path):
    res = run(
        [
            PY,
            "-m",
            "nodepert_dist.train",
            "--cpu_devices=4",
            "--expected_devices=8",
            *SMALL,
            f"--data_dir={mnist_dir}",
            f"--workdir={tmp_path}/w",
        ],
        timeout=60,
    )
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("error: expected 8 devices (--expected_devices) but the job sees 4")
    )
