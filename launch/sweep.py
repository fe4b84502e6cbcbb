#!/usr/bin/env python3
"""Hyperparameter sweeps: a grid of flag values x seeds -> one run (one workdir) per combination.

    python launch/sweep.py --spec=launch/sweeps/lr_np_vs_sgd.json --mode=print
    python launch/sweep.py --spec=... --mode=local --parallel=2      # run here, 2 at a time
    python launch/sweep.py --spec=... --mode=slurm > sweep.sbatch    # a SLURM job array
    python launch/sweep.py --spec=... --mode=summary                 # CSV of finished runs
    python launch/sweep.py --spec=... --mode=table                   # markdown, seeds pooled
    python launch/sweep.py --spec=... --as_population --mode=local  # lr/sigma/seed/wd rows as
                                                    # one --population job per other setting

The spec's format and the rows it gives: nodepert_dist/sweep.py. Imports no jax.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# Run from a checkout: the package next to this script, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nodepert_dist import sweep, sweep_launch, sweep_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file or .py file defining SPEC")
    parser.add_argument(
        "--mode", choices=("print", "local", "slurm", "summary", "table"), default="print"
    )
    parser.add_argument("--index", type=int, default=None, help="only this row (print/local)")
    parser.add_argument("--parallel", type=int, default=1, help="local mode: runs at a time")
    parser.add_argument("--skip_finished", action="store_true", help="local mode")
    parser.add_argument("--out", default=None, help="summary CSV (default <root>/summary.csv)")
    parser.add_argument(
        "--as_population",
        action="store_true",
        help="train the rows that differ only in lr, sigma, seed or wd as one --population job "
        "(one compiled program, one workdir); give it to every mode of the same sweep",
    )
    args = parser.parse_args(argv)

    spec = sweep.load_spec(args.spec)
    runs = sweep.expand(spec)
    # what runs: a row each, or with --as_population one job per population (rows -> members)
    jobs = sweep.populations(runs, spec) if args.as_population else runs
    if args.index is not None:
        if not 0 <= args.index < len(jobs):
            sweep.fail(f"--index={args.index} is outside 0..{len(jobs) - 1}")
        jobs = [jobs[args.index]]
    if args.mode == "print":
        for r in jobs:
            print(shlex.join(r["argv"]))
    elif args.mode == "slurm":
        sys.stdout.write(sweep_launch.slurm_script(jobs, spec, args.spec))
    elif args.mode == "local":
        sweep_launch.check_command(jobs)
        failures = sweep_launch.run_local(jobs, args.parallel, args.skip_finished)
        if failures:
            print(f"[sweep] error: {failures} of {len(jobs)} job(s) failed", file=sys.stderr)
            return 1
    elif args.mode == "table":
        sys.stdout.write(sweep_report.table(runs))
    else:
        out = args.out or os.path.join(spec.get("root", "runs/sweep"), "summary.csv")
        written, skipped = sweep_report.summary(runs, out)
        print(f"[sweep] {out}: {written} finished run(s), {skipped} unfinished skipped")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except sweep.SweepError as e:  # every problem with the spec or its runs: one line
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # an unwritable root or --out: one line, as for every other problem
        raise SystemExit(f"error: {e.filename or 'sweep'}: {e.strerror}") from None
