"""A population in one compiled step vs the same members run one after another.

    python benchmarks/population.py                          # fc and conv, NP and SGD, N=1..64
    python benchmarks/population.py --quick                  # smoke run (seconds)
    python benchmarks/population.py --target --data_dir=data # the issue's 8-member epoch target
    python benchmarks/population.py --cpu_devices=8 --members=8 --placements=1,2,4,8 --batchsize=128

Steps: for each network x rule x N, the train step of an N-member lr population
(`run_setup.make_train_step`, as nodepert-train builds it) against N sequential steps of one solo
run's step (each of N solo runs would also compile its own): examples/s per member, the
speed-up, and memory per member from XLA's memory analysis of the compiled step
((arguments + temporaries) / N). Inputs are MNIST-shaped random batches on one device.

--placements=M,...: placement instead (M: --member_devices). The first --members N population on
all devices, on the mesh member=M x data=devices/M for each M (run_setup.make_train_step, as nodepert-train
builds it; each device trains N/M members on batch/(devices/M) examples), timed alternately:
step time and examples/s per member.

--target: real MNIST, fc 784-500-500-10 NP, batch 100, one epoch: an 8-member lr population
through nodepert-train's loop against 8 solo runs of it (wall time of each whole run, its
epoch_time, and each member's test accuracy next to its solo run's). --solo says how the runs
start: `jobs`, each its own `python -m nodepert_dist.train` process, as a one-job-per-row sweep
runs them (interpreter and jax start-up, data, compiling, evaluation: what a user waits for);
`in_process`, all in this process (start-up paid once: only the step, compiling and
evaluation differ); `both` (the default) writes one row for each.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from nodepert_dist import cli, files

# nodepert_dist.train defines --data_dir, --batchsize, --cpu_devices (and the rest of its CLI).
from nodepert_dist import train as train_lib
from nodepert_dist.data import DataError

flags.DEFINE_list("networks", ["fc", "conv"], "Networks.")
flags.DEFINE_list("rules", ["np", "sgd"], "Update rules.")
flags.DEFINE_list("members", ["1", "4", "16", "64"], "Population sizes N.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds; the median is reported.")
flags.DEFINE_float("round_s", 0.5, "Least seconds of steps per variant per round.")
flags.DEFINE_bool("quick", False, "Smoke run: fc (1 hidden layer of 32), NP, N=1,2, 1 round.")
flags.DEFINE_bool("target", False, "The 8-member NP lr population epoch vs 8 solo epochs.")
flags.DEFINE_enum(
    "solo",
    "both",
    ["both", "jobs", "in_process"],
    "--target: runs as separate nodepert-train processes, in this process, or both.",
)
flags.DEFINE_list("placements", [], "Placement: the --member_devices values to time.")
flags.DEFINE_string("out", "benchmarks/results/population.jsonl", "JSON lines (appended).")
FLAGS = flags.FLAGS
cli.check_list("members", pattern=cli.POSITIVE_INT, what="a positive integer")
cli.check_list("networks", choices=("fc", "linfc", "conv", "conv-large"))
cli.check_list("rules", choices=("np", "sgd"))
cli.check_list("placements", pattern=cli.POSITIVE_INT, what="a positive integer")

TARGET_LRS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)
# the target's runs (besides the preset mnist_fc_np), in either --solo mode
TARGET_SETTINGS = dict(num_epochs=1, eval_train=False, checkpoint_every_epochs=0)


def _lrs(n: int) -> str:
    return "lr:" + ",".join(f"{0.01 * (1 + i / 8):g}" for i in range(n))


def _timed(fn, state, batch, n):
    import jax

    start = time.perf_counter()
    for _ in range(n):
        state, m = fn(state, *batch)
    jax.block_until_ready((state, m))
    return state, (time.perf_counter() - start) / n


def _compiled(cfg, model, mesh, x, batch):
    """(step, state, MB of arguments + temporaries, compile s) of cfg's run."""
    from nodepert_dist import population, run_setup

    optimizer, step = run_setup.make_train_step(cfg, model, mesh, steps_per_epoch=600)
    state = population.init_state(cfg, model, optimizer, x, mesh)
    t0 = time.perf_counter()
    mem = step.lower(state, *batch).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    mb = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20 if mem else float("nan")
    return step, state, mb, compile_s


def population_rows(networks, rules, sizes, *, rounds, round_s, batchsize, shape):
    """Yields a row per (network, rule, N): a population step against N solo steps on one
    device, timed alternately over `rounds` (each >= `round_s` seconds of steps)."""
    import jax
    import numpy as np

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import models
    from nodepert_dist.config import Config

    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    b = batchsize
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, 28, 28, 1)).astype(np.float32)
    batch = mesh_lib.global_batch(mesh, x, rng.integers(0, 10, b).astype(np.int32))
    for network in networks:
        for rule in rules:
            base = Config(network=network, update_rule=rule, batchsize=b, **shape).resolved()
            model = models.build(base.model, 10)
            runs = {"solo": _compiled(base, model, mesh, x, batch)}
            for n in sizes:
                pop = Config(**{**vars(base), "population": _lrs(n)})
                runs[n] = _compiled(pop, model, mesh, x, batch)
            timing = {}
            for key, (step, state, _, _) in runs.items():
                state, t = _timed(step, state, batch, 2)  # warm-up; sizes the rounds
                timing[key] = {"state": state, "n": max(1, int(round_s / t)), "t": []}
            for _ in range(rounds):
                for key, r in timing.items():
                    r["state"], t = _timed(runs[key][0], r["state"], batch, r["n"])
                    r["t"].append(t)
            solo_s = statistics.median(timing["solo"]["t"])
            for n in sizes:
                step_s = statistics.median(timing[n]["t"])
                yield {
                    "network": network,
                    "rule": rule,
                    "batchsize": b,
                    "members": n,
                    "device_kind": jax.devices()[0].device_kind,
                    "step_ms": 1e3 * step_s,
                    "solo_step_ms": 1e3 * solo_s,
                    "examples_per_s_per_member": b / step_s,
                    "solo_examples_per_s": b / solo_s,
                    "speedup_vs_sequential": n * solo_s / step_s,
                    "mb_per_member": runs[n][2] / n,
                    "solo_mb": runs["solo"][2],
                    "compile_s": runs[n][3],
                    "solo_compile_s": runs["solo"][3],
                }


def placement_rows(network, rule, n, groups, *, rounds, round_s, batchsize, shape):
    """Yields a row per M in `groups`: the n-member lr population's step on all devices as
    member=M x data=devices/M, each timed alternately over `rounds` (>= `round_s` s each)."""
    import jax
    import numpy as np

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import models
    from nodepert_dist.config import Config

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batchsize, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batchsize).astype(np.int32)
    timing = {}
    for m in groups:
        cfg = Config(
            network=network,
            update_rule=rule,
            batchsize=batchsize,
            population=_lrs(n),
            member_devices=m,
            **shape,
        ).resolved()
        cfg.validate()
        mesh = mesh_lib.make_mesh(member_devices=m)
        mesh_lib.check_batch(batchsize, mesh)
        batch = mesh_lib.global_batch(mesh, x, y)
        step, state, mb, compile_s = _compiled(cfg, models.build(cfg.model, 10), mesh, x, batch)
        state, t = _timed(step, state, batch, 2)  # warm-up; sizes the rounds
        timing[m] = dict(step=step, state=state, batch=batch, n=max(1, int(round_s / t)), t=[])
        timing[m].update(mb=mb, compile_s=compile_s)
    for _ in range(rounds):
        for r in timing.values():
            r["state"], t = _timed(r["step"], r["state"], r["batch"], r["n"])
            r["t"].append(t)
    base = statistics.median(timing[groups[0]]["t"])
    for m, r in timing.items():
        step_s = statistics.median(r["t"])
        yield {
            "network": network,
            "rule": rule,
            "batchsize": batchsize,
            "members": n,
            "member_devices": m,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "step_ms": 1e3 * step_s,
            "examples_per_s_per_member": batchsize / step_s,
            f"speedup_vs_member_devices_{groups[0]}": base / step_s,
            "mb_per_device": r["mb"],
            "compile_s": r["compile_s"],
        }


def placement() -> None:
    groups = [int(m) for m in FLAGS.placements]
    shape = dict(n_hl=1, hl_size=32) if FLAGS.quick else dict(n_hl=2, hl_size=500)
    rounds = 1 if FLAGS.quick else FLAGS.rounds
    for network in FLAGS.networks:
        for rule in FLAGS.rules:
            timing = _timing(rounds, shape)
            for row in placement_rows(network, rule, int(FLAGS.members[0]), groups, **timing):
                _append(row)
                print(
                    f"{network:5s} {rule:3s} N={row['members']} member_devices="
                    f"{row['member_devices']}  {row['step_ms']:8.2f} ms/step  "
                    f"{row['examples_per_s_per_member']:9.0f} ex/s per member",
                    flush=True,
                )


def _timing(rounds: int, shape: dict) -> dict:
    """The measurement settings both modes pass to their rows."""
    return dict(rounds=rounds, round_s=FLAGS.round_s, batchsize=FLAGS.batchsize, shape=shape)


def _append(row) -> None:
    """One row to --out, its folder made when the first row is ready (a fresh clone has no
    benchmarks/results/; bad input, refused before any row, leaves nothing behind)."""
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    files.append_jsonl(FLAGS.out, [row])


def steps() -> None:
    networks, rules = FLAGS.networks, FLAGS.rules
    sizes = [int(n) for n in FLAGS.members]
    rounds, shape = FLAGS.rounds, dict(n_hl=2, hl_size=500)
    if FLAGS.quick:
        networks, rules, sizes, rounds, shape = ["fc"], ["np"], [1, 2], 1, dict(n_hl=1, hl_size=32)
    for row in population_rows(networks, rules, sizes, **_timing(rounds, shape)):
        _append(row)
        print(
            f"{row['network']:5s} {row['rule']:3s} N={row['members']:3d}  "
            f"{row['examples_per_s_per_member']:9.0f} ex/s per member "
            f"(solo {row['solo_examples_per_s']:.0f})  x{row['speedup_vs_sequential']:.2f} vs "
            f"sequential  {row['mb_per_member']:.2f} MB/member (solo {row['solo_mb']:.2f})",
            flush=True,
        )


def _job(**kw) -> tuple[float, list]:
    """One `python -m nodepert_dist.train` process (the target's settings and `kw`), as a
    one-job-per-row sweep starts it: its wall time and its metrics rows."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "-m",
            "nodepert_dist.train",
            "--config=mnist_fc_np",
            *(f"--{k}={v}" for k, v in TARGET_SETTINGS.items()),
            f"--data_dir={FLAGS.data_dir}",
            f"--workdir={workdir}",
            f"--cpu_devices={FLAGS.cpu_devices}",  # the devices the in-process runs see
            *(f"--{k}={v}" for k, v in kw.items()),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        took = time.perf_counter() - t0
        if done.returncode:  # e.g. no MNIST in --data_dir: the child's own one-line error
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            lines = [line for line in lines if line.startswith("error: ")] or lines
            raise ValueError(
                f"nodepert_dist.train {command[-1]}: {lines[-1].removeprefix('error: ')}"
            )
        return took, files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _in_process(**kw) -> tuple[float, list]:
    """The same run through train.train in this process: its wall time and its rows."""
    settings = dict(
        train_lib.config_lib.PRESETS["mnist_fc_np"], **TARGET_SETTINGS, data_dir=FLAGS.data_dir
    )
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        rows = train_lib.train(train_lib.Config(**{**settings, **kw}, workdir=workdir))
        return time.perf_counter() - t0, rows


def target_row(one, solo: str) -> dict:
    """The 8 solo runs and the population, each started by `one`, the population between
    the two halves of the solo runs (a drifting load hits both alike)."""
    half = len(TARGET_LRS) // 2
    solos = [one(lr=lr) for lr in TARGET_LRS[:half]]
    pop_s, pop_rows = one(population="lr:" + ",".join(map(str, TARGET_LRS)))
    solos += [one(lr=lr) for lr in TARGET_LRS[half:]]
    last = [r for r in pop_rows if r["epoch"] == 1]
    row = {
        "target": "8-member NP lr population, fc 784-500-500-10, batch 100, 1 epoch",
        "solo": solo,
        "population_s": pop_s,
        "solo_runs_s": sum(s for s, _ in solos),
        "population_epoch_time": last[0]["epoch_time"],
        "solo_epoch_times": sum(rows[-1]["epoch_time"] for _, rows in solos),
        "test_acc": [r["test_acc"] for r in last],
        "solo_test_acc": [rows[-1]["test_acc"] for _, rows in solos],
        "load_avg_1min_after": os.getloadavg()[0],  # a shared machine: how busy it was
    }
    row["ratio"] = row["population_s"] / row["solo_runs_s"]
    row["epoch_ratio"] = row["population_epoch_time"] / row["solo_epoch_times"]
    row["max_acc_gap"] = max(abs(a - b) for a, b in zip(row["test_acc"], row["solo_test_acc"]))
    return row


def target() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    modes = {"jobs": _job, "in_process": _in_process}
    for solo in modes if FLAGS.solo == "both" else [FLAGS.solo]:
        row = target_row(modes[solo], solo)
        _append(row)
        print(files.json_text(row, indent=2), flush=True)


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.cpu_devices:
        from nodepert_dist import mesh as mesh_lib

        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    try:
        target() if FLAGS.target else placement() if FLAGS.placements else steps()
    except (ValueError, DataError) as e:  # a missing dataset, a batch the devices do not divide
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    FLAGS.set_default("batchsize", 100)
    app.run(main, flags_parser=cli.flags_parser("population.py"))
