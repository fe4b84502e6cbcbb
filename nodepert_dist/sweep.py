"""Hyperparameter sweeps: a grid of flag values x seeds -> one run (one workdir) per row.

The library behind `launch/sweep.py` (the command) and the grid experiments: the spec, its rows
(`expand`) and which rows finished (`final_row`); running them (sweep_launch.py: here or as a
SLURM job array) and their results (sweep_report.py: summary CSV, markdown table).

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
Standard library only (the launcher imports no jax): a test checks it.
"""

from __future__ import annotations

import itertools
import os
import re
import runpy
from typing import NoReturn

from nodepert_dist import files, run_record

DEFAULT_COMMAND = ["nodepert-train"]


# ----------------------------------------------------------------------------- spec -> rows


class SweepError(ValueError):
    """A bad spec or a sweep that cannot run: one line (launch/sweep.py prints it as `error:`)."""


def fail(message: str) -> NoReturn:
    raise SweepError(message)


SPEC_KEYS = ("command", "root", "base", "grid", "seeds", "slurm", "variants")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def load_spec(path: str) -> dict:
    """The spec at `path` (JSON, with or without a Windows editor's byte-order mark, or a .py
    defining SPEC), checked; any problem is a SweepError (one line)."""
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
            spec = files.read_json(path)
        except files.FileFormatError as e:
            fail(str(e))
    check_spec(spec, path)
    return spec


def check_spec(spec, path: str) -> None:
    if not isinstance(spec, dict):
        fail(f"{path}: the spec must be a JSON object, not {type(spec).__name__}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        fail(f"unknown spec keys {sorted(unknown)} in {path} (known: {', '.join(SPEC_KEYS)})")
    command = spec.get("command", DEFAULT_COMMAND)
    if not (
        isinstance(command, list) and command and all(isinstance(c, str) and c for c in command)
    ):
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
    if (
        not isinstance(variants, dict)
        or not variants
        or not all(isinstance(v, dict) for v in variants.values())
    ):
        fail("variants must be a non-empty dict of name -> dict of flags")
    seeds = spec.get("seeds", 1)
    if not (
        (type(seeds) is int and seeds >= 1)
        or (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds))
    ):
        fail(f'{path}: "seeds" must be a count >= 1 or a non-empty list of integers, not {seeds!r}')
    for name in [*spec.get("base", {}), *spec.get("grid", {}), *spec.get("slurm", {})] + [
        k for v in variants.values() for k in v
    ]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            fail(f"{path}: {name!r} is not a flag or option name")


def seeds_of(spec: dict) -> list:
    seeds = spec.get("seeds", 1)
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def fmt(value) -> str:
    """A value in a workdir name or table cell: true/false, 0.01, a,b."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value)
    return str(value)


def flag_arg(name: str, value) -> str:
    """One command-line flag the way absl reads it: true -> --name, false -> --noname
    (`--noeval_train=true` is an error in absl), a list -> --name=a,b (absl's list flags)."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if (
        value is None
        or isinstance(value, dict)
        or (
            isinstance(value, (list, tuple))
            and any(isinstance(v, (list, tuple, dict)) or v is None for v in value)
        )
    ):
        fail(
            f"flag {name!r} has the value {value!r}; give a number, string, true/false or a "
            f"list of those"
        )
    return f"--{name}={fmt(value)}"


def run_name(settings: dict) -> str:
    """Workdir name from the swept settings: 'update_rule=np,lr=0.01,seed=0' (path-safe)."""
    parts = [f"{k}={fmt(v)}" for k, v in settings.items()]
    return ",".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def expand(spec: dict) -> list[dict]:
    """Every run: {'index', 'settings' (swept values + seed), 'flags' (all), 'workdir', 'argv'}."""
    grid = spec.get("grid", {})
    root = spec.get("root", "runs/sweep")
    command = list(spec.get("command", DEFAULT_COMMAND))
    rows = []
    variants = spec.get("variants", {None: {}})
    for (variant, variant_flags), values in itertools.product(
        variants.items(), itertools.product(*grid.values())
    ):
        for seed in seeds_of(spec):
            settings = {} if variant is None else {"variant": variant}
            settings.update(zip(grid.keys(), values))
            settings["seed"] = seed
            workdir = os.path.join(root, run_name(settings))
            swept = {k: v for k, v in settings.items() if k != "variant"}
            run_flags = {**spec.get("base", {}), **variant_flags, **swept, "workdir": workdir}
            argv = command + [flag_arg(k, v) for k, v in run_flags.items()]
            rows.append(
                {
                    "index": len(rows),
                    "settings": settings,
                    "flags": run_flags,
                    "workdir": workdir,
                    "argv": argv,
                }
            )
    return rows


# ----------------------------------------------------------------------------- finished runs


def num_epochs_of(run: dict) -> int | None:
    """The run's num_epochs from its config.json (what it actually ran with), else its flags."""
    config = os.path.join(run["workdir"], "config.json")
    if os.path.exists(config):
        try:
            return int(files.read_json(config)["num_epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or half-written: the spec's value
    value = run["flags"].get("num_epochs")
    return None if value is None else int(value)


def run_rows(run: dict) -> list[dict]:
    """The run's metrics.jsonl rows; a population member's (`populations`): its own rows and
    events out of its population's file."""
    rows = run_record.read_metrics(run["workdir"])
    if "member" in run:
        rows = [r for r in rows if r.get("member") == run["member"]]
    return rows


def final_row(run: dict) -> dict | None:
    """The last metrics row if the run finished, else None (a member frozen for a divergence or
    a crash did not finish, as its solo run under the crash guard would not have)."""
    rows = run_rows(run)
    if "member" in run:
        if any(r.get("event", "").startswith("member_") for r in rows):
            return None
        rows = [r for r in rows if "event" not in r]
    target = num_epochs_of(run)
    if not rows or target is None or rows[-1].get("epoch") != target:
        return None
    return rows[-1]


# ----------------------------------------------------------------------------- populations

TRAINER_MODULE = "nodepert_dist.train"


def populations(runs: list[dict], spec: dict) -> list[dict]:
    """--as_population: the jobs that train `runs` (expand's rows). Rows that differ only in
    run_record.MEMBER_SETTINGS (lr, sigma, seed, wd) become one `--population` job each, in
    a workdir named after the other settings plus ",population"; a row alone in its group stays
    a solo job. Each member row gets `member` (its index in the job's grid) and the job's
    workdir, so final_row and the reports read its rows there. Jobs: expand's keys, plus
    `members` for a population job."""
    command = list(spec.get("command", DEFAULT_COMMAND))
    if command != DEFAULT_COMMAND and TRAINER_MODULE not in command:
        fail(
            f"--as_population trains with the trainer's --population; the spec's command "
            f"{command} is not nodepert-train (drop --as_population for other commands)"
        )
    root = spec.get("root", "runs/sweep")
    groups: dict = {}
    for run in runs:
        key = tuple((k, fmt(v)) for k, v in run["settings"].items() if k not in _MEMBER)
        groups.setdefault(key, []).append(run)
    jobs = []
    for group in groups.values():
        if len(group) == 1:
            jobs.append(dict(group[0], index=len(jobs)))
            continue
        settings = {k: v for k, v in group[0]["settings"].items() if k not in _MEMBER}
        swept = [k for k in group[0]["settings"] if k in _MEMBER]  # grid order, seed last
        values = {k: list(dict.fromkeys(r["settings"][k] for r in group)) for k in swept}
        # expand's rows are the grid's product with later keys varying fastest, as
        # population.members lists a --population's members: row i of the group is member i
        population = ";".join(f"{k}:{fmt(v)}" for k, v in values.items())
        name = ",".join(filter(None, [run_name(settings), "population"]))
        workdir = os.path.join(root, name)
        flags = {k: v for k, v in group[0]["flags"].items() if k not in (*swept, "workdir")}
        flags.update(population=population, workdir=workdir)
        for i, run in enumerate(group):
            run.update(member=i, workdir=workdir)
        argv = command + [flag_arg(k, v) for k, v in flags.items()]
        jobs.append(
            dict(
                index=len(jobs),
                settings=settings,
                flags=flags,
                workdir=workdir,
                argv=argv,
                members=group,
            )
        )
    return jobs


_MEMBER = run_record.MEMBER_SETTINGS
