"""The GPU suite's sections that run another benchmark in its own process (loop_overhead.py,
population.py): their flags are nodepert-train's, which share names with throughput.py's (the
suite's), and a child never preallocates the GPU the suite already holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from nodepert_dist import files

LOOPS = ("before", "after", "k4", "device", "device_k16")
# The suite's own process already holds XLA's default 75% of a GPU: a child process allocates
# what it uses instead of trying to reserve 75% of the card again.
_CHILD_ENV = dict(
    os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"
)  # benchmarks/loop_overhead.py's loop settings


def loop_section(args, budget, emit):
    """benchmarks/loop_overhead.py (fc NP, synthetic MNIST-shaped data: a loaned machine has no
    MNIST), one batch size per process (its flags are nodepert-train's, which share names with
    throughput.py's) while the budget lasts (its loops too: --budget_s, the share's time left);
    a batch's estimate is the last one's time."""
    est, out = 1.0, f"{args.out}.loop"
    script = os.path.join(os.path.dirname(__file__), "loop_overhead.py")
    for b in args.batchsizes:
        size = (
            ["--quick"] if args.quick else [f"--batchsizes={b}", "--examples=16384", "--epochs=3"]
        )
        t, why = time.perf_counter(), "over the section's budget"
        fits = est is not None and budget.fits(est)
        if fits:
            left = f"--budget_s={max(budget.end - t, 1.0):.0f}"  # its loops stop at the share's end
            loops = [] if args.quick else [f"--loops={','.join(LOOPS)}"]
            cmd = [sys.executable, script, *size, *loops, left, f"--out={out}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_CHILD_ENV)
            why = (proc.stderr.strip().splitlines() or ["failed"])[-1] if proc.returncode else ""
        for row in (
            files.read_jsonl(out) if not why else [dict(batchsize=b, loop=loop) for loop in LOOPS]
        ):
            for key in ("device_kind", "quick"):  # emit's
                row.pop(key, None)
            emit("loop", dict(row, network="fc", **({"skipped": why} if why else {})))
        if os.path.exists(out):
            os.remove(out)
        # a skipped size must not reset the estimate (the population section's fault, seen on
        # an H200): batch sizes grow, so none after it is tried
        est = time.perf_counter() - t if fits else None


def population_section(args, budget, emit):
    """fc NP lr populations of growing N while the budget lasts, each measured by
    benchmarks/population.py in its own process (its flags are nodepert-train's, which share
    names with throughput.py's); an N's estimate is 3x the last measured one's time, and once
    one N does not fit no larger N is tried (it would cost more)."""
    est, out = 1.0, f"{args.out}.population"
    script = os.path.join(os.path.dirname(__file__), "population.py")
    for sizes in [(1, 2)] if args.quick else [(1,), (4,), (16,), (64,)]:
        # quick: population.py's own smoke run as tests/test_benchmarks.py runs it alone (its
        # compiled steps come from a shared compilation cache there)
        size = ["--quick"] if args.quick else [f"--members={sizes[0]}"]
        t, why = time.perf_counter(), "over the section's budget"
        fits = est is not None and budget.fits(est)
        if fits:
            cmd = [sys.executable, script, *size, "--networks=fc", "--rules=np", f"--out={out}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_CHILD_ENV)
            why = (proc.stderr.strip().splitlines() or ["failed"])[-1] if proc.returncode else ""
        for row in files.read_jsonl(out) if not why else [dict(members=n) for n in sizes]:
            row.pop("device_kind", None)  # emit's
            emit("population", dict(row, network="fc", **({"skipped": why} if why else {})))
        if os.path.exists(out):
            os.remove(out)
        est = 3 * (time.perf_counter() - t) if fits else None  # None: no larger N is tried
