#!/usr/bin/env python3
"""Hyperparameter sweeps: a grid of flag values x seeds -> one run (one workdir) per combination.

    python launch/sweep.py --spec=launch/sweeps/lr_np_vs_sgd.json --mode=print
    python launch/sweep.py --spec=... --mode=local --parallel=2      # run here, 2 at a time
    python launch/sweep.py --spec=... --mode=slurm > sweep.sbatch    # a SLURM job array
    python launch/sweep.py --spec=... --mode=summary                 # CSV of finished runs
    python launch/sweep.py --spec=... --mode=table                   # markdown, seeds pooled

Spec (JSON, or a .py file defining a dict SPEC):
    {"command": ["nodepert-train"],             # optional, this is the default
     "root": "runs/sweeps/lr_np_vs_sgd",         # the workdirs go under it
     "base": {"num_epochs": 10},                 # flags shared by every run
     "grid": {"update_rule": ["np", "sgd"], "lr": [0.01, 0.001]},
     "variants": {"plain": {}, "jvp": {"np_delta": "jvp"}},  # optional: named flag sets,
                                                 # one more grid axis (outermost), "variant=NAME"
     "seeds": 2,                                 # or an explicit list [0, 1, 7]
     "slurm": {"time": "02:00:00", "gpus": 1}}   # optional sbatch options, for --mode=slurm
Flag values: true -> --flag, false -> --noflag (as absl reads them), a list -> --flag=a,b.
Rows are the product of the grid values in spec order with the seed innermost; row i is what
SLURM_ARRAY_TASK_ID=i runs. A run is finished when the last epoch in its metrics.jsonl equals
its num_epochs; --mode=summary and --skip_finished leave unfinished runs out / in.
Standard library only: it does not import jax.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import runpy
import shlex
import re
import shutil
import subprocess
import sys
import time
from typing import NoReturn, Optional

DEFAULT_COMMAND = ["nodepert-train"]
SUMMARY_METRICS = ("epoch", "step", "test_acc", "test_loss", "train_acc", "train_loss",
                   "mean_step_loss", "examples_per_s")


# ----------------------------------------------------------------------------- spec -> rows

def fail(message: str) -> NoReturn:
    raise SystemExit(f"error: {message}")  # one line on stderr, status 1


SPEC_KEYS = ("command", "root", "base", "grid", "seeds", "slurm", "variants")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def load_spec(path: str) -> dict:
    """The spec at `path` (JSON, read as utf-8-sig so a Windows editor's byte-order mark is
    fine, or a .py defining SPEC), checked; any problem is one `error:` line."""
    if not os.path.isfile(path):
        fail(f"spec {path} not found (--spec: a JSON file or a .py defining SPEC)")
    if path.endswith(".py"):
        try:
            spec = runpy.run_path(path).get("SPEC")
        except Exception as e:  # the user's own code: any failure is theirs to fix
            fail(f"{path} failed to run: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        if not isinstance(spec, dict):
            fail(f"{path} does not define a dict SPEC")
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:
                spec = json.load(f)
        except UnicodeDecodeError as e:
            fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            fail(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    check_spec(spec, path)
    return spec


def check_spec(spec, path: str) -> None:
    if not isinstance(spec, dict):
        fail(f"{path}: the spec must be a JSON object, not {type(spec).__name__}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        fail(f"unknown spec keys {sorted(unknown)} in {path} (known: {', '.join(SPEC_KEYS)})")
    command = spec.get("command", DEFAULT_COMMAND)
    if not (isinstance(command, list) and command and all(isinstance(c, str) and c for c in command)):
        fail(f'{path}: "command" must be a non-empty list of strings, e.g. ["nodepert-train"]')
    if not isinstance(spec.get("root", ""), str) or spec.get("root") == "":
        fail(f'{path}: "root" must be a folder name')
    for key in ("base", "grid", "slurm"):
        if not isinstance(spec.get(key, {}), dict):
            fail(f'{path}: "{key}" must be an object (name -> value)')
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            fail(f"grid entry {key!r} must be a non-empty list")
    variants = spec.get("variants", {"-": {}})
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, dict) for v in variants.values()):
        fail("variants must be a non-empty dict of name -> dict of flags")
    seeds = spec.get("seeds", 1)
    if not ((type(seeds) is int and seeds >= 1) or (isinstance(seeds, list) and seeds and all(
            type(s) is int for s in seeds))):
        fail(f'{path}: "seeds" must be a count >= 1 or a non-empty list of integers, not {seeds!r}')
    for name in [*spec.get("base", {}), *spec.get("grid", {}), *spec.get("slurm", {})] + [
            k for v in variants.values() for k in v]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            fail(f"{path}: {name!r} is not a flag or option name")


def seeds_of(spec: dict) -> list:
    seeds = spec.get("seeds", 1)
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def _fmt(value) -> str:
    """A value in a workdir name or table cell: true/false, 0.01, a,b."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def flag_arg(name: str, value) -> str:
    """One command-line flag the way absl reads it: true -> --name, false -> --noname
    (`--noeval_train=true` is an error in absl), a list -> --name=a,b (absl's list flags)."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if value is None or isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(
            isinstance(v, (list, tuple, dict)) or v is None for v in value)):
        fail(f"flag {name!r} has the value {value!r}; give a number, string, true/false or a "
             f"list of those")
    return f"--{name}={_fmt(value)}"


def run_name(settings: dict) -> str:
    """Workdir name from the swept settings: 'update_rule=np,lr=0.01,seed=0' (path-safe)."""
    parts = [f"{k}={_fmt(v)}" for k, v in settings.items()]
    return ",".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def expand(spec: dict) -> list[dict]:
    """Every run: {'index', 'settings' (swept values + seed), 'flags' (all), 'workdir', 'argv'}."""
    grid = spec.get("grid", {})
    root = spec.get("root", "runs/sweep")
    command = list(spec.get("command", DEFAULT_COMMAND))
    rows = []
    variants = spec.get("variants", {None: {}})
    for (variant, variant_flags), values in itertools.product(variants.items(),
                                                             itertools.product(*grid.values())):
        for seed in seeds_of(spec):
            settings = {} if variant is None else {"variant": variant}
            settings.update(zip(grid.keys(), values))
            settings["seed"] = seed
            workdir = os.path.join(root, run_name(settings))
            swept = {k: v for k, v in settings.items() if k != "variant"}
            run_flags = {**spec.get("base", {}), **variant_flags, **swept, "workdir": workdir}
            argv = command + [flag_arg(k, v) for k, v in run_flags.items()]
            rows.append({"index": len(rows), "settings": settings, "flags": run_flags,
                         "workdir": workdir, "argv": argv})
    return rows


# ----------------------------------------------------------------------------- finished runs

def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a half-written last line: the run is not finished
    return rows


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The epoch rows of a metrics.jsonl: event rows (crash guard) dropped, and of a file where
    the epochs start over (two runs appended by versions before the fresh-start rule) the last
    run only. The rule of nodepert_dist.metrics.epoch_rows (this script imports no package)."""
    rows = [r for r in rows if "event" not in r]
    restarts = [i for i in range(1, len(rows)) if rows[i]["epoch"] <= rows[i - 1]["epoch"]]
    return rows[restarts[-1]:] if restarts else rows


def num_epochs_of(run: dict) -> Optional[int]:
    """The run's num_epochs from its config.json (what it actually ran with), else its flags."""
    config = os.path.join(run["workdir"], "config.json")
    if os.path.exists(config):
        try:
            with open(config) as f:
                return int(json.load(f)["num_epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or half-written: the spec's value
    value = run["flags"].get("num_epochs")
    return None if value is None else int(value)


def final_row(run: dict) -> Optional[dict]:
    """The last metrics row if the run finished, else None."""
    rows = read_metrics(run["workdir"])
    target = num_epochs_of(run)
    if not rows or target is None or rows[-1].get("epoch") != target:
        return None
    return rows[-1]


def summary(runs: list[dict], out_path: str) -> tuple[int, int]:
    """Writes one CSV row per finished run (settings + final metrics); returns (written, skipped)."""
    setting_cols = list(runs[0]["settings"]) if runs else []
    written = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, ["index"] + setting_cols + list(SUMMARY_METRICS) + ["workdir"],
                           extrasaction="ignore")
        w.writeheader()
        for run in runs:
            row = final_row(run)
            if row is None:
                continue
            w.writerow({"index": run["index"], **run["settings"], **row, "workdir": run["workdir"]})
            written += 1
    return written, len(runs) - written


def table(runs: list[dict], thresholds=(0.90, 0.93, 0.95)) -> str:
    """Markdown, one row per setting with its seeds pooled: epochs, final and best test accuracy
    (mean and half the min-max range over seeds), training seconds to reach each threshold (the
    summed epoch_time up to the first epoch at or above it, mean over seeds; '-' unless every
    seed reached it; epoch resolution) with the epochs that took in brackets (seconds depend on
    the machine's load, epochs do not), examples/s (median of all epochs), the command."""
    groups: dict = {}
    for run in runs:
        key = tuple((k, v) for k, v in run["settings"].items() if k != "seed")
        groups.setdefault(key, []).append(run)
    pct = lambda vs: f"{100 * sum(vs) / len(vs):.1f} ± {50 * (max(vs) - min(vs)):.1f}"
    head = ["setting", "epochs", "final test %", "best test %"]
    head += [f"s to {100 * t:g}%" for t in thresholds] + ["examples/s", "seeds", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in groups.items():
        metric_rows = [epoch_rows(read_metrics(r["workdir"])) for r in members if final_row(r)]
        if not metric_rows:
            continue
        # epoch rows only (event rows such as the crash guard's rollbacks have no accuracy);
        # epoch 0 is the untrained net; a non-finite accuracy is written as null
        epochs = [[r for r in m if isinstance(r.get("epoch"), int) and "event" not in r
                   and r["epoch"] > 0 and isinstance(r.get("test_acc"), (int, float))]
                  for m in metric_rows]
        if not all(epochs):
            continue
        cells = [",".join(f"{k}={_fmt(v)}" for k, v in key) or "-", str(len(epochs[0])),
                 pct([e[-1]["test_acc"] for e in epochs]),
                 pct([max(r["test_acc"] for r in e) for e in epochs])]
        for t in thresholds:
            times, counts = [], []
            for e in epochs:
                first = next((i for i, r in enumerate(e) if r["test_acc"] >= t), None)
                counts.append(first if first is None else first + 1)
                times.append(first if first is None else sum(r["epoch_time"] for r in e[:first + 1]))
            cells.append("-" if None in times else
                         f"{sum(times) / len(times):.0f} ({sum(counts) / len(counts):g})")
        speeds = sorted(r["examples_per_s"] for e in epochs for r in e)
        cells += [f"{speeds[len(speeds) // 2]:,.0f}", str(len(epochs))]
        flags = {k: v for k, v in members[0]["flags"].items() if k not in ("workdir", "seed")}
        argv = members[0]["argv"]
        command = argv[:len(argv) - len(members[0]["flags"])]
        command += [flag_arg(k, v) for k, v in flags.items()]
        cells.append(f"`{shlex.join(command)} --seed=S`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- modes

_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@%+=-]+")


def sbatch_value(value) -> str:
    """A value on an #SBATCH line as sbatch's own parser reads it: plain when it can be, else in
    double quotes with \\ and " escaped (sbatch splits at spaces and takes an unquoted # for a
    comment)."""
    text = str(value)
    if "\n" in text or "\r" in text:
        fail(f"sbatch option value {text!r} spans lines")
    if _SBATCH_PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_script(runs: list[dict], spec: dict, spec_path: str) -> str:
    """A job array: task i runs row i (its command is written into the script) under srun, with
    the templates' preemption story: SIGUSR1 120 s before the time limit (a preemption sends
    SIGTERM), the row checkpoints and exits 75, and the task requeues itself; the requeued task
    runs the same command, which resumes from its workdir. Every value is quoted for sbatch's
    parser (#SBATCH lines) or bash's (the rest)."""
    if not runs:
        fail("the spec gives no runs")
    root = spec.get("root", "runs/sweep")
    opts = {"job-name": "nodepert-sweep", "time": "04:00:00", "cpus-per-task": 8, "gpus": 1,
            "output": os.path.join(root.replace("%", "%%"), "slurm-%A_%a.out"),
            "open-mode": "append", "requeue": True, "signal": "USR1@120", **spec.get("slurm", {})}
    lines = ["#!/bin/bash",
             f"# Generated by launch/sweep.py from {spec_path!r}: {len(runs)} runs; job-array task "
             f"i runs row i.", f"#SBATCH --array=0-{len(runs) - 1}"]
    for k, v in opts.items():
        if v is True:
            lines.append(f"#SBATCH --{k}")
        elif v is not False and v is not None:
            lines.append(f"#SBATCH --{k}={sbatch_value(v)}")
    lines += ["", "set -uo pipefail  # no -e: the row's exit status is examined below",
              "# Preemption may send SIGTERM to this shell too: it must outlive srun to requeue.",
              "trap 'echo \"sweep row ${SLURM_ARRAY_TASK_ID:-?}: got SIGTERM; waiting for the run "
              "to checkpoint\"' TERM",
              f"mkdir -p {shlex.quote(root)} || exit 1",
              'case "${SLURM_ARRAY_TASK_ID:?run this with sbatch (a job array)}" in']
    lines += [f"  {r['index']}) ROW=({shlex.join(r['argv'])}) ;;" for r in runs]
    lines += [f'  *) echo "error: no sweep row ${{SLURM_ARRAY_TASK_ID}} (rows 0-{len(runs) - 1})" '
              ">&2; exit 2 ;;", "esac",
              'echo "sweep row ${SLURM_ARRAY_TASK_ID}: ${ROW[*]}"',
              'srun "${ROW[@]}"', "rc=$?",
              "# 75: preempted with a checkpoint (nodepert_dist/preempt.py); this attempt's status only.",
              'if [ "$rc" -eq 75 ]; then',
              '  echo "sweep row ${SLURM_ARRAY_TASK_ID}: preempted (restart ${SLURM_RESTART_COUNT:-0}); '
              'requeueing"',
              '  scontrol requeue "${SLURM_JOB_ID}"', "fi", 'exit "$rc"', ""]
    return "\n".join(lines)


def run_local(runs: list[dict], parallel: int, skip_finished: bool, log=print) -> int:
    """Runs each row here, `parallel` at a time, output to <workdir>/run.log; returns failures.
    A row that cannot start (its command is missing) is a failure written to its run.log; the
    rows after it still run."""
    todo = [r for r in runs if not (skip_finished and final_row(r) is not None)]
    if len(todo) < len(runs):
        log(f"[sweep] skipping {len(runs) - len(todo)} finished run(s)")
    running, failures = [], 0
    while todo or running:
        while todo and len(running) < max(1, parallel):
            run = todo.pop(0)
            os.makedirs(run["workdir"], exist_ok=True)
            logf = open(os.path.join(run["workdir"], "run.log"), "w")
            log(f"[sweep] start {run['index']}: {shlex.join(run['argv'])}")
            try:
                proc = subprocess.Popen(run["argv"], stdout=logf, stderr=subprocess.STDOUT)
            except OSError as e:
                logf.write(f"error: could not start {run['argv'][0]!r}: {e.strerror}\n")
                logf.close()
                failures += 1
                log(f"[sweep] FAILED {run['index']} (could not start {run['argv'][0]!r}: "
                    f"{e.strerror}): {run['workdir']}")
                continue
            running.append((run, proc, logf))
        time.sleep(0.2)
        for item in list(running):
            run, proc, logf = item
            if proc.poll() is not None:
                logf.close()
                running.remove(item)
                ok = proc.returncode == 0
                failures += not ok
                log(f"[sweep] {'done' if ok else 'FAILED'} {run['index']} "
                    f"(status {proc.returncode}): {run['workdir']}")
    return failures


def check_command(runs: list[dict]) -> None:
    """Stops before any row starts when the rows' program is not there to run."""
    for program in sorted({r["argv"][0] for r in runs}):
        if shutil.which(program) is None:
            fail(f'the spec\'s "command" starts with {program!r}, which is not an executable '
                 f"here (not on PATH, or not executable); fix \"command\" or the environment")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file or .py file defining SPEC")
    parser.add_argument("--mode", choices=("print", "local", "slurm", "summary", "table"),
                        default="print")
    parser.add_argument("--index", type=int, default=None, help="only this row (print/local)")
    parser.add_argument("--parallel", type=int, default=1, help="local mode: runs at a time")
    parser.add_argument("--skip_finished", action="store_true", help="local mode")
    parser.add_argument("--out", default=None, help="summary CSV (default <root>/summary.csv)")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    runs = expand(spec)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise SystemExit(f"error: --index={args.index} is outside 0..{len(runs) - 1}")
        runs = [runs[args.index]]
    if args.mode == "print":
        for r in runs:
            print(shlex.join(r["argv"]))
    elif args.mode == "slurm":
        sys.stdout.write(slurm_script(runs, spec, args.spec))
    elif args.mode == "local":
        check_command(runs)
        failures = run_local(runs, args.parallel, args.skip_finished)
        if failures:
            print(f"[sweep] error: {failures} of {len(runs)} run(s) failed", file=sys.stderr)
            return 1
    elif args.mode == "table":
        sys.stdout.write(table(runs))
    else:
        out = args.out or os.path.join(spec.get("root", "runs/sweep"), "summary.csv")
        written, skipped = summary(runs, out)
        print(f"[sweep] {out}: {written} finished run(s), {skipped} unfinished skipped")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:  # an unwritable root or --out: one line, as for every other problem
        fail(f"{e.filename or 'sweep'}: {e.strerror}")
