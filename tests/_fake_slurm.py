"""Stand-ins for SLURM's `srun` and `scontrol` (and `nvidia-smi`) on PATH, to run the job scripts
(launch/slurm/*.sbatch, sweep.py --mode=slurm) over several attempts of one job without SLURM.

`srun [--opt=value ...] cmd args`: runs `cmd` once per task (SLURM_NTASKS, SLURM_PROCID=t) and
writes each task's output to --output (%t = task) in --open-mode, else in SLURM_OPEN_MODE ('a' or
'append' appends, as sbatch's --open-mode=append sets it); exits with the highest task status,
or FAKE_SRUN_STATUS when set (what --kill-on-bad-exit can make of a job whose tasks exit 75).
`scontrol requeue ID` appends ID to $FAKE_SLURM_DIR/requeued.
`fake-train`: a stand-in for nodepert-train whose attempt k (SLURM_RESTART_COUNT) exits with the
k-th status of FAKE_OUTCOMES; process 0 prints preempt.py's line when that status is 75.
"""

import os
import stat
import sys

SRUN = r"""#!/usr/bin/env python3
import os, subprocess, sys
args, opts = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
mode = opts.get("open-mode") or os.environ.get("SLURM_OPEN_MODE", "truncate")
status = 0
for task in range(int(os.environ.get("SLURM_NTASKS", "1"))):
    env = dict(os.environ, SLURM_PROCID=str(task))
    if "output" in opts:
        with open(opts["output"].replace("%t", str(task)), "a" if mode[0] in "aA" else "w") as out:
            rc = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    else:
        rc = subprocess.run(args, env=env).returncode
    status = max(status, rc)
sys.exit(int(os.environ.get("FAKE_SRUN_STATUS") or status))
"""

SCONTROL = r"""#!/bin/bash
[ "$1" = requeue ] || { echo "fake scontrol: only 'requeue'" >&2; exit 2; }
echo "$2" >> "$FAKE_SLURM_DIR/requeued"
"""

NVIDIA_SMI = '#!/bin/bash\nfor i in 0 1; do echo "GPU $i: fake"; done\n'

TRAIN = r"""#!/usr/bin/env python3
import os, sys
attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
status = int(os.environ["FAKE_OUTCOMES"].split(",")[attempt])
if os.environ.get("SLURM_PROCID", "0") == "0":
    print(f"attempt {attempt}: epoch 1 of 3 " + " ".join(sys.argv[1:]))
    if status == 75:
        print("preempted at step 7: checkpoint saved; run the same command again to resume")
    elif status:
        print("error: something failed")
sys.exit(status)
"""


def install(bin_dir, train_name="nodepert-train") -> None:
    """Writes the fakes into bin_dir (put it first on PATH)."""
    os.makedirs(bin_dir, exist_ok=True)
    for name, text in (
        ("srun", SRUN),
        ("scontrol", SCONTROL),
        ("nvidia-smi", NVIDIA_SMI),
        (train_name, TRAIN),
    ):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(text.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def requeued(fake_dir) -> list[str]:
    path = os.path.join(fake_dir, "requeued")
    return open(path).read().split() if os.path.exists(path) else []
