"""Preemption: a signal mid-epoch stops every process at the same step with a checkpoint and
exit 75; the same command then finishes with exactly the metrics of an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_command, subprocess_env

from nodepert_dist import checkpoint_layout, preempt

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

PY = sys.executable
LAUNCH = str(REPO / "launch" / "local.py")
# 7 steps of 8000 examples per epoch; the signal lands at step 10 = epoch 2, step 3 of 7.
SMALL = [
    "--n_hl=1",
    "--hl_size=32",
    "--batchsize=8000",
    "--num_epochs=2",
    "--eval_batchsize=2000",
    "--checkpoint_every_epochs=1",
    "--preemption_check_steps=5",  # the signal at step 10 stops there, on 1 or 2 processes
]
TIMING = ("epoch_time", "examples_per_s")


_env = subprocess_env


def _run(cmd, **extra):
    return run_command(cmd, 240, **extra)


def _untimed(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("processes", [1, 2])
def test_signal_mid_epoch_checkpoints_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path, mnist_dir, processes
):
    def cmd(workdir):
        train = [
            PY,
            "-m",
            "nodepert_dist.train",
            *SMALL,
            f"--data_dir={mnist_dir}",
            f"--workdir={workdir}",
        ]
        if processes == 1:
            return train
        return [
            PY,
            LAUNCH,
            f"--num_processes={processes}",
            "--devices_per_process=2",
            "--timeout_s=200",
            "--",
            *train,
        ]

    # Only the last process gets the signal: the others must stop at the same step anyway.
    hook = "10" if processes == 1 else f"10@{processes - 1}"
    out = _run(cmd(tmp_path / "cut"), **{preempt.TEST_SIGNAL_ENV: hook})
    assert out.returncode == preempt.EXIT_CODE, (out.stdout + out.stderr)[-3000:]
    text = out.stdout + out.stderr
    assert text.count("preempted by ") == processes, text[-3000:]
    last = [l for l in text.splitlines() if "preempted by " in l][-1]
    assert "at step 10: checkpoint saved; run the same command again to resume (exit 75)" in last
    steps = checkpoint_layout.committed_steps(str(tmp_path / "cut" / "checkpoints"))
    assert steps == [7, 10]  # epoch 1's and the preemption's
    manifest = checkpoint_layout.read_manifest(
        checkpoint_layout.step_dir(str(tmp_path / "cut" / "checkpoints"), 10)
    )
    assert (manifest["loop"]["epoch"], manifest["loop"]["step_in_epoch"]) == (2, 3)
    assert [r["epoch"] for r in _untimed(tmp_path / "cut")] == [0, 1]

    out = _run(cmd(tmp_path / "cut"))  # the same command again: resumes at step 10
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "at epoch 2, step 3 of the epoch (step 10 in all)" in out.stdout + out.stderr
    out = _run(cmd(tmp_path / "whole"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    whole = _untimed(tmp_path / "whole")
    assert [r["epoch"] for r in whole] == [0, 1, 2] and whole[-1]["step"] == 14
    assert _untimed(tmp_path / "cut") == whole  # bit-identical: same layout, same seed


@pytest.mark.parametrize("script", ["multinode", "singlenode"])
@pytest.mark.parametrize("rc, requeued", [(75, True), (0, False), (1, False)])
def test_sbatch_templates_requeue_on_the_preemption_exit_code(tmp_path, script, rc, requeued):
    # Fake srun / scontrol / nvidia-smi on PATH: the templates' own shell logic runs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("srun", f'echo srun "$@" >> {tmp_path}/calls; exit {rc}'),
        ("scontrol", f'echo scontrol "$@" >> {tmp_path}/calls'),
        ("nvidia-smi", "echo GPU 0; echo GPU 1"),
    ):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_NTASKS="16",
    )
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm" / f"{script}.sbatch"), "--num_epochs=3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == rc, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("srun ") and "--workdir=runs/slurm/4242/run" in calls[0]
    assert calls[0].endswith("--num_epochs=3")
    assert (calls[1:] == ["scontrol requeue 4242"]) == requeued, calls
    sbatch = (REPO / "launch" / "slurm" / f"{script}.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and "#SBATCH --signal=USR1@120" in sbatch


def test_watcher_records_sigusr1_and_restores_the_handlers():
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    with preempt.Watcher(check_every=3) as watcher:
        assert not watcher.stop_now(3)
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@120
        assert not watcher.stop_now(4)  # only at multiples of check_every
        assert watcher.stop_now(6) and watcher.describe() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_landing_inside_a_log_write_is_told_once_by_the_loop(capsys):
    """A handler runs wherever the main thread is, here inside a write to the log's stream: a
    handler that logged itself re-entered that stream (a "Logging error", or a raise)."""
    import io
    import logging as std_logging
    import signal

    class Raw(io.RawIOBase):
        sent, data = False, b""

        def writable(self):
            return True

        def write(self, b):
            if not Raw.sent:  # the signal arrives mid-write
                Raw.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            Raw.data += bytes(b)
            return len(b)

    stream = io.TextIOWrapper(io.BufferedWriter(Raw()), line_buffering=True)
    handler = std_logging.StreamHandler(stream)
    logger = std_logging.getLogger("absl")
    logger.addHandler(handler)
    try:
        with preempt.Watcher(check_every=1) as watcher:
            logger.warning("a line the loop was writing")
            assert watcher.signal == signal.SIGTERM
            assert b"stopping" not in Raw.data
            assert watcher.stop_now(1) and watcher.stop_now(2)
    finally:
        logger.removeHandler(handler)
    told = Raw.data.decode().splitlines()
    assert told == [
        "a line the loop was writing",
        "got SIGTERM: stopping at the next step boundary to checkpoint",
    ]
    assert "Logging error" not in capsys.readouterr().err


def test_the_default_check_is_every_step_alone_and_every_20_with_several_processes(monkeypatch):
    """With several processes the agreement is a collective the host waits for: checking it
    every step would keep an accelerator's queue empty."""
    assert preempt.Watcher().check_every == 1
    monkeypatch.setattr(preempt.jax, "process_count", lambda: 2)
    assert preempt.Watcher().check_every == preempt.MULTIPROCESS_CHECK_STEPS == 20
    assert preempt.Watcher(check_every=3).check_every == 3


def test_launcher_forwards_sigterm_and_exits_75_when_every_rank_was_preempted():
    script = (
        "import os, signal, sys, time; r = os.environ['NODEPERT_PROCESS_ID'];"
        "signal.signal(signal.SIGTERM, lambda *a: (print('rank', r, 'saving', flush=True),"
        " time.sleep(0.5 * int(r)), sys.exit(75)));"
        "print('ready', r, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [PY, LAUNCH, "--num_processes=2", "--timeout_s=60", "--", PY, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    lines = []
    while len([l for l in lines if l.startswith(("[0] ready", "[1] ready"))]) < 2:
        lines.append(proc.stdout.readline())
    proc.send_signal(__import__("signal").SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines += out.splitlines()
    assert proc.returncode == preempt.EXIT_CODE, lines
    assert "[1] rank 1 saving" in "\n".join(lines)  # the slower rank was not killed
    assert lines[-1] == "[launch] preempted: 2 rank(s) checkpointed and exited 75"


@pytest.mark.parametrize(
    "sig, rc, said",
    [
        ("SIGTERM", 1, "[launch] got SIGTERM; forwarded it to every rank"),  # the ranks die of it
        ("SIGINT", 130, "[launch] error: launcher got SIGINT; killed all ranks"),
    ],
)
def test_a_signal_landing_while_the_launcher_writes_a_line_is_still_acted_on(sig, rc, said):
    """The handler runs in the main thread wherever it is: here inside its own output write (the
    line lock held). A handler that wrote or took that lock itself deadlocked (seen in CI: the
    ranks never got the SIGTERM)."""
    driver = (
        "import os, signal, sys\n"
        "class Out:\n"
        "    sent = False\n"
        "    def write(self, s):\n"
        "        if 'process(es)' in s and not Out.sent:\n"
        "            Out.sent = True\n"
        f"            os.kill(os.getpid(), signal.{sig})\n"
        "        sys.__stdout__.write(s)\n"
        "    def flush(self):\n"
        "        sys.__stdout__.flush()\n"
        "sys.stdout = Out()\n"
        f"sys.path.insert(0, {str(REPO / 'launch')!r})\n"
        "import local\n"
        "sys.exit(local.main(['--num_processes=2', '--timeout_s=60', '--', sys.executable,"
        " '-c', 'import time; time.sleep(60)']))\n"
    )
    out = subprocess.run(
        [PY, "-c", driver], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30
    )
    lines = out.stdout.splitlines()
    assert out.returncode == rc, (out.stdout, out.stderr)
    assert said in lines
    if sig == "SIGTERM":
        assert lines[-1].startswith("[launch] error: rank ") and "SIGTERM" in lines[-1], lines
    assert not out.stderr, out.stderr


def _descendants(pid):
    """Child processes of every thread of `pid` (Grain's threads spawn the workers)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            pass
    return kids


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


def test_sigterm_to_the_process_group_with_data_workers_saves_and_exits_75(tmp_path, mnist_dir):
    """SLURM and a terminal signal the whole process group, Grain's workers included: the run
    must still stop at a step, save and exit 75; and a --max_steps run with workers closes them,
    so the last line it prints says why it stopped (no resource_tracker warning after it)."""
    import signal
    import time

    cmd = [
        PY,
        "-m",
        "nodepert_dist.train",
        "--n_hl=1",
        "--hl_size=16",
        "--batchsize=100",
        "--num_epochs=2",
        "--noeval_train",
        "--eval_batchsize=2000",
        "--data_workers=2",
        "--cpu_devices=1",
        f"--data_dir={mnist_dir}",
        f"--workdir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while (
            len([k for k in _descendants(proc.pid) if "spawn_main" in _cmdline(k)]) < 2
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its workers started"
        os.killpg(proc.pid, signal.SIGTERM)  # the run and its workers, as SLURM does
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == preempt.EXIT_CODE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("preempted by SIGTERM at step ") and "checkpoint saved" in last, last
    step = checkpoint_layout.committed_steps(str(tmp_path / "run" / "checkpoints"))[-1]
    assert f"at step {step}:" in last
    # The same command with --max_steps resumes there and stops 5 steps later.
    out = _run(cmd + [f"--max_steps={step + 5}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step {step} in all" in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"stopped at --max_steps={step + 5} (step {step + 5}, 0 of 2 epochs done); rerun with a "
            f"larger --max_steps to continue"
        )
    ), out.stderr[-2000:]
    assert "leaked" not in out.stderr
