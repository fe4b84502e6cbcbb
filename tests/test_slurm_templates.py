"""launch/slurm/*.sbatch over several attempts of one job (fake srun/scontrol on PATH, see
tests/_fake_slurm.py): a job is requeued after a preempted attempt and never after a finished or
failed one, although --open-mode=append keeps the earlier attempts' lines in the task logs."""

import os
import pathlib
import subprocess

import _fake_slurm
import pytest

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_attempts(tmp_path, template, outcomes, srun_status=None, ntasks=2):
    """Runs `template` once per outcome as the attempts of job 4242; returns their exit codes."""
    _fake_slurm.install(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "FAKE_OUTCOMES": ",".join(map(str, outcomes)),
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "gpu001",
        "SLURM_OPEN_MODE": "a",
    }  # what --open-mode=append sets
    codes = []
    for attempt in range(len(outcomes)):
        if attempt:
            env["SLURM_RESTART_COUNT"] = str(attempt)
        if srun_status is not None:
            env["FAKE_SRUN_STATUS"] = str(srun_status[attempt])
        res = subprocess.run(
            ["bash", str(REPO / "launch" / "slurm" / template), "--num_epochs=3"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        codes.append(res.returncode)
    return codes


@pytest.mark.parametrize("template", ["multinode.sbatch", "singlenode.sbatch"])
@pytest.mark.parametrize(
    "outcomes, requeues",
    [
        ((75, 0), 1),  # preempted, then finished: requeued once
        ((75, 1), 1),  # preempted, then failed: not requeued again
        ((75, 75, 0), 2),  # preempted twice
        ((1,), 0),
    ],
)
def test_requeue_follows_this_attempts_outcome_only(tmp_path, template, outcomes, requeues):
    assert run_attempts(tmp_path, template, outcomes) == list(outcomes)
    assert _fake_slurm.requeued(tmp_path) == ["4242"] * requeues
    log = (tmp_path / "runs" / "slurm" / "4242" / "task-0.log").read_text()
    assert log.count("attempt ") == len(outcomes)  # every attempt's lines are kept


def test_multinode_requeues_when_srun_reports_a_kill_after_this_attempts_checkpoint(tmp_path):
    # --kill-on-bad-exit: the first task to exit 75 gets the others killed and srun reports 137;
    # process 0's line of this attempt decides. The next attempt's own failure does not requeue.
    codes = run_attempts(tmp_path, "multinode.sbatch", (75, 1), srun_status=(137, 137))
    assert codes == [137, 137]
    assert _fake_slurm.requeued(tmp_path) == ["4242"]
