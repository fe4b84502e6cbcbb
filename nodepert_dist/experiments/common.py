"""What every experiment command shares: its base config, training runs (one, or a grid through
nodepert_dist.sweep), run outcomes, and result files (CSV/JSON/PNG written through files.py: under
a temporary name, then renamed, so nothing is ever half written; process 0 only).

Every experiment command takes every `nodepert-train` flag (this module imports train.py, which
defines them) plus the flags below and its own. Its base config is its preset
(nodepert_dist/presets.py: EXPERIMENT_PRESETS, or --preset), with any training flag given on
the command line on top.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import flags

from nodepert_dist import (
    checkpoint_layout,
    crash_guard,
    distributed,
    files,
    metrics,
    presets,
    run_record,
    sweep,
    sweep_launch,
    train,
)
from nodepert_dist import mesh as mesh_lib
from nodepert_dist.experiments import probes

flags.DEFINE_string(
    "out",
    None,
    "Results folder (default runs/experiments/<experiment>); rerunning with the same one resumes.",
)
flags.DEFINE_string(
    "preset",
    None,
    "Base settings from nodepert_dist/presets.py (default: the "
    "experiment's own); training flags given here override them.",
)
flags.DEFINE_enum(
    "launch",
    "inprocess",
    ["inprocess", "local", "slurm", "none"],
    "Grid experiments: train here one run after another (inprocess), as "
    "subprocesses (local, --parallel at a time), write a SLURM job array to "
    "<out>/sweep.sbatch (slurm), or only aggregate finished runs (none).",
)
flags.DEFINE_integer("parallel", 1, "--launch=local: runs at a time.")
flags.DEFINE_list("lrs", None, "Learning rates (default: the experiment's log-spaced grid).")
flags.DEFINE_integer("seeds", 1, "Seeds per grid point (0..N-1).")
flags.DEFINE_bool(
    "as_population",
    False,
    "Grid experiments: train the grid points that differ only in lr, sigma, seed or wd as one "
    "--population job each (one compiled step and workdir; members share the data order, "
    "--seed's; a member that diverges or crashes is frozen while the others go on).",
)
FLAGS = flags.FLAGS


class ExperimentError(ValueError):
    """Bad input or missing results: printed as one line."""


class Submitted(Exception):
    """--launch=slurm wrote the job array: the command stops here (not an error)."""


# ----------------------------------------------------------------------------- set-up


def setup_devices() -> None:
    """What `nodepert-train` does before touching a device (CPU flags, processes)."""
    if FLAGS.xla_cpu_conv_flag:
        mesh_lib.tune_cpu_convolutions()
    mesh_lib.reproducible_compilation(FLAGS.deterministic, FLAGS.compilation_cache_dir)
    if FLAGS.cpu_devices > 0:
        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    distributed.initialize_from_flags()


def base_config(experiment: str, **forced) -> train.Config:
    """The experiment's preset, then the training flags set on the command line, then `forced`."""
    name = FLAGS.preset or presets.EXPERIMENT_PRESETS[experiment]
    if name not in presets.PRESETS:
        raise ExperimentError(f"--preset={name!r} is not one of {', '.join(presets.PRESETS)}")
    values = dict(presets.PRESETS[name])
    for f in dataclasses.fields(train.Config):
        if FLAGS[f.name].present:
            values[f.name] = FLAGS[f.name].value
    values.update(forced)
    cfg = train.Config(**values)
    cfg.validate()
    if cfg.population:  # the experiments run their own grids (crash-timing: --as_population)
        raise ExperimentError(
            f"--population: {experiment} runs its own grid of runs; drop --population"
        )
    return cfg


def out_dir(experiment: str) -> str:
    out = FLAGS.out or os.path.join("runs", "experiments", experiment)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExperimentError(f"--out={out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    return out


def lrs(default: list[float]) -> list[float]:
    try:
        values = [float(v) for v in FLAGS.lrs] if FLAGS.lrs else list(default)
    except ValueError:
        raise ExperimentError(f"--lrs={','.join(FLAGS.lrs)} must be numbers") from None
    if not values or min(values) <= 0:
        raise ExperimentError("--lrs must be positive")
    return values


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{v:.3g}") for v in np.geomspace(lo, hi, n)]


def int_list(text, name: str) -> list[int]:
    try:
        values = [int(v) for v in text]
    except ValueError:
        raise ExperimentError(f"--{name} must be integers") from None
    if not values or min(values) <= 0:
        raise ExperimentError(f"--{name} must be positive integers")
    return values


# ----------------------------------------------------------------------------- training runs


def overrides(cfg: train.Config) -> dict:
    """The fields of `cfg` that differ from Config's defaults (flags of a sweep spec)."""
    default = train.Config()
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name) and getattr(cfg, f.name) is not None
    }


def train_once(cfg: train.Config, hooks=()) -> dict:
    """Trains `cfg` here (resuming its workdir); returns its outcome (see `outcome`).

    With cfg.crash_guard the guard runs it; a crash it gives up on, or a non-finite loss without
    it, ends the run: that is a result here, not an error."""
    try:
        if cfg.crash_guard:
            crash_guard.run(train.run, cfg, hooks)
        else:
            train.run(cfg, hooks)
    except (
        crash_guard.Diverged,
        checkpoint_layout.NonFiniteState,
    ) as e:  # in the loss or the params
        files.write_json(
            os.path.join(cfg.workdir, "outcome.json"), {"status": "diverged", "detail": str(e)}
        )
    except crash_guard.GaveUp:
        pass  # its events are in metrics.jsonl
    return outcome(cfg.workdir, cfg.num_epochs)


def outcome(workdir: str, num_epochs: int, member: int | None = None) -> dict:
    """{'status': finished | crashed | diverged | unfinished, 'rows': epoch rows, ...}; of one
    member of a population run when `member` is given (its rows, its freeze event)."""
    logged = run_record.read_metrics(workdir)
    if member is not None:
        logged = [r for r in logged if r.get("member") == member]
    rows, events = run_record.epoch_rows(logged), [r for r in logged if "event" in r]
    result = {"rows": rows, "events": events}
    frozen = [e for e in events if e["event"] in ("member_crashed", "member_diverged")]
    if member is not None and frozen:  # as its solo run under the crash guard would end: at
        e = frozen[0]  # the crash epoch's row, or before the epoch it diverged in (a frozen
        crashed = e["event"] == "member_crashed"  # member's later rows repeat its state)
        last = e["epoch"] - (not crashed)
        return dict(
            result,
            rows=[r for r in rows if r["epoch"] <= last],
            status="crashed" if crashed else "diverged",
            event_epoch=e["epoch"],
        )
    gave_up = [e for e in events if e["event"] == "gave_up"]
    path = os.path.join(workdir, "outcome.json")
    log = os.path.join(workdir, "run.log")  # subprocess runs (sweep_launch.run_local)
    if gave_up:
        e = gave_up[-1]
        result.update(
            status="crashed" if e["reason"] == "crash" else "diverged",
            event_epoch=e["last_good_epoch"] + 1,
        )
    elif os.path.exists(path):
        result.update(files.read_json(path))
    elif os.path.exists(log) and _diverged_log(log):
        result["status"] = "diverged"
    elif rows and rows[-1]["epoch"] >= num_epochs:
        result["status"] = "finished"
    else:
        result["status"] = "unfinished"
    if result["status"] == "diverged" and "event_epoch" not in result:
        result["event_epoch"] = (rows[-1]["epoch"] + 1) if rows else 1
    return result


def _diverged_log(path: str) -> bool:
    with open(path, errors="replace") as f:
        return "training diverged" in f.read()


def run_grid(
    base: train.Config,
    grid: dict,
    seeds: int,
    root: str,
    launch: str = "inprocess",
    parallel: int = 1,
    as_population: bool = False,
) -> list[dict]:
    """Every (grid point x seed) run of `base` via nodepert_dist.sweep; returns its run dicts,
    each with its `cfg` and `outcome`. Finished, crashed and diverged runs are not rerun.
    as_population: the runs that differ only in member settings train as one --population job
    (sweep.populations); each run is then a member, its outcome read from the job's workdir."""
    spec = {
        "command": [sys.executable, "-m", "nodepert_dist.train"]
        + ([f"--cpu_devices={FLAGS.cpu_devices}"] if _flag("cpu_devices") else [])
        + (["--deterministic"] if FLAGS.deterministic else [])
        + (
            [f"--compilation_cache_dir={FLAGS.compilation_cache_dir}"]
            if FLAGS.compilation_cache_dir
            else []
        ),
        "root": root,
        "base": {k: v for k, v in overrides(base).items() if k != "workdir"},
        "grid": grid,
        "seeds": list(range(seeds)),
    }
    files.write_json(os.path.join(root, "sweep_spec.json"), spec)
    runs = sweep.expand(spec)
    jobs = sweep.populations(runs, spec) if as_population else runs
    for run in runs + jobs:
        run["cfg"] = dataclasses.replace(base, **run["flags"])
    done = lambda r: outcome(r["workdir"], r["cfg"].num_epochs)["status"] != "unfinished"
    todo = [r for r in jobs if not done(r)]
    if launch == "inprocess":
        for run in todo:
            train_once(run["cfg"])
    elif launch == "local":
        if sweep_launch.run_local(todo, parallel, skip_finished=False):
            print("[experiments] some runs failed; see their run.log (aggregating the rest)")
    elif launch == "slurm":
        path = os.path.join(root, "sweep.sbatch")
        files.write_text(
            path, sweep_launch.slurm_script(todo, spec, os.path.join(root, "sweep_spec.json"))
        )
        raise Submitted(
            f"wrote {path} ({len(todo)} runs): submit it with sbatch, then run "
            f"this command again with --launch=none to aggregate"
        )
    for run in runs:
        run["outcome"] = outcome(run["workdir"], run["cfg"].num_epochs, run.get("member"))
    return runs


def _flag(name: str) -> bool:
    return name in FLAGS and FLAGS[name].present


# ----------------------------------------------------------------------------- result files


def write_json(path: str, obj) -> str:
    if metrics.is_writer():
        files.write_json(path, obj)
    return path


def write_csv(path: str, rows: list[dict]) -> str:
    """A tidy CSV: one row per observation, columns in first-seen order; None, NaN -> empty."""
    if metrics.is_writer():
        files.write_csv(path, rows)
    return path


def figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.2)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), dpi=110, squeeze=False
    )
    return fig, axes


def log_axis(ax, which: str = "x", ticks=None) -> None:
    """A log axis; with `ticks` (e.g. the lr grid), labelled at exactly those values in plain
    numbers (matplotlib's own minor labels overlap on ranges of one or two decades)."""
    from matplotlib.ticker import NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    if ticks is not None and len(ticks) <= 12:
        getattr(ax, f"set_{which}ticks")(list(ticks), [f"{t:g}" for t in ticks])
        getattr(ax, f"{which}axis").set_minor_formatter(NullFormatter())


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    if metrics.is_writer():
        fig.tight_layout()
        with files.atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
    plt.close(fig)
    return path


def jsonl_to_csv(jsonl: str, csv_path: str) -> list[dict]:
    rows = files.read_jsonl(jsonl)
    write_csv(csv_path, rows)
    return rows


def done(paths: list[str]) -> None:
    """The command's last words: the files it wrote."""
    if metrics.is_writer():
        for p in paths:
            print(p)


def command(body):
    """absl main for an experiment: `body()` returns the files it wrote; bad input -> one line."""
    from nodepert_dist.data.raw import DataError

    def main(argv):
        if len(argv) > 1:
            raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
        try:
            setup_devices()
            paths = body()
        except Submitted as e:
            print(e)
            return
        # OSError: e.g. a read-only or full --out (as nodepert-train)
        except (ValueError, OSError, DataError, distributed.DistributedError) as e:
            raise SystemExit(f"error: {e}") from None
        done(paths)

    return main


def run_summary(run: dict, crash_points: float) -> dict:
    """One tidy row per grid run: its settings, status, final/best accuracy, first crash."""
    o, rows = run["outcome"], run["outcome"]["rows"]
    trained = [r for r in rows if r["epoch"] > 0]
    crash = crash_guard.first_crash(rows, crash_points)
    row = {
        **run["settings"],
        "status": o["status"],
        "epochs": rows[-1]["epoch"] if rows else 0,
        "final_acc": trained[-1]["test_acc"] if trained and o["status"] == "finished" else None,
        "best_acc": max((r["test_acc"] for r in trained), default=None),
        "crash_epoch": crash["epoch"] if crash else o.get("event_epoch"),
        "workdir": run["workdir"],
    }
    return row


def load_point(cfg: train.Config, step: int):
    """(run, model, params on one device) of cfg's run at checkpoint `step`: the run as
    `nodepert-train` builds it (run_setup.build: every setting), its state restored from that
    checkpoint; with --decorrelate the model is bound to that checkpoint's matrices."""
    from nodepert_dist import decorrelation, run_setup

    run = run_setup.build(cfg, mesh_lib.make_mesh())
    try:
        state = run.restore(step)
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    decor = None if state.decor is None else probes.local_copy(state.decor)
    return run, decorrelation.bind(run.model, decor), probes.local_copy(state.params)
