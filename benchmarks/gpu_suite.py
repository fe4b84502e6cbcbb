"""Everything the README's GPU table needs, in one command that fits a short GPU loan (<= 8 min).

    python benchmarks/gpu_suite.py                  # on a GPU: --budget_s=420 by default
    python benchmarks/gpu_suite.py --quick          # CPU smoke run of every section (tests)
    python benchmarks/gpu_suite.py --sections=precision --networks=vgg,resnet --budget_s=60

Sections, in this order (each gets a share of --budget_s; what does not fit is recorded as
skipped, never silently dropped):

1. `precision`: NP's mean estimate under the device's default matmul precision (TF32 on an
   Ampere/Hopper GPU) against `highest`, same noise (benchmarks/bf16_sigma.py's paired
   comparison, small nets), at each network's TF32 sigma floor and below it: does the floor in
   nodepert_dist/precision.py hold on this device? On a CPU both precisions are float32.
2. `loop`: benchmarks/loop_overhead.py on synthetic MNIST-shaped data: the train loop's epoch
   time (fc NP, the real loop) against the same epoch's compiled calls back to back, for the
   loop as it was (a metrics read per step), the defaults, --steps_per_call=4, and
   --data_on_device with 1 and 16 steps a call (what the budget leaves out is recorded).
3. `peak`: the matmul peak of this device (a large jnp.dot), float32 at `highest` and bfloat16:
   the MFU reference of the next sections (the steps run at `highest`, the project's default).
4. `steps`: NP (Rademacher) vs SGD step time, peak temp memory, FLOPs and MFU for fc, conv,
   conv-large, vgg and resnet at full width (CIFAR-shaped input), float32 and bfloat16,
   batch 128 and 1024 (cheapest first).
5. `noise`: NP with Rademacher vs Gaussian noise (fc, conv; batch 1024, float32).

6. `population`: an N-member fc NP lr population's step against N solo steps (N = 1, 4, 16,
   64 while the budget lasts; benchmarks/population.py's `population_rows`): the speed-up of
   running a sweep as one program on this device, and the memory per member.

Timing, FLOP and memory analysis are benchmarks/throughput.py's (`run_steps`,
`compiled_costs`, `matmul_peak`, `build_step`). Output: JSON lines (--out, one row per
measurement, each with its section, device and date) and a README-ready markdown table (--table)
titled with jax.devices()[0].device_kind and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
import traceback

import bf16_sigma
import jax
import jax.numpy as jnp
import numpy as np
import throughput
from gpu_suite_children import loop_section, population_section
from gpu_suite_table import table

from nodepert_dist import cli, files, models, optim, precision
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib

# Each section's share of --budget_s; a section ends at the sum of the shares so far, so time
# an earlier one left unused goes to the next (5% is kept for the table and slack).
SHARES = {"precision": 0.10, "loop": 0.10, "steps": 0.50, "noise": 0.10, "population": 0.15}
CIFAR = (32, 32, 3)


def _positive(kind):
    """argparse type: a positive `kind` (a bad value: one line naming the flag)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v

    return parse


def _section(name):
    if name not in SHARES:
        raise argparse.ArgumentTypeError(f"unknown section {name!r}; sections: {', '.join(SHARES)}")
    return name


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget_s",
        type=_positive(float),
        default=420.0,
        help="seconds for all sections together (start-up not counted)",
    )
    parser.add_argument(
        "--networks",
        default="fc,conv,conv-large,vgg,resnet",
        type=bf16_sigma.comma_list(bf16_sigma.network_name),
    )
    parser.add_argument("--batchsizes", default="128,1024", type=bf16_sigma.comma_list(int))
    parser.add_argument(
        "--sections",
        default=",".join(SHARES),
        type=bf16_sigma.comma_list(_section),
        help="the sections to run, in the suite's order whatever the order given; the budget "
        "is shared among them (the matmul peak is measured when steps or noise run)",
    )
    parser.add_argument("--rounds", type=_positive(int), default=5)
    parser.add_argument("--round_s", type=float, default=0.2, help="least seconds per round")
    parser.add_argument("--draws", type=_positive(int), default=1000, help="precision section")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: fc and conv, batch 8 (population.py: its own --quick), 1 round, tiny sizes",
    )
    parser.add_argument("--out", default="benchmarks/results/gpu_suite.jsonl")
    parser.add_argument("--table", default="benchmarks/results/gpu_suite.md")
    args = parser.parse_args(argv)
    if any(b <= 0 for b in args.batchsizes):
        parser.error(f"--batchsizes must be positive integers, got {args.batchsizes}")
    if args.quick:
        args.networks, args.batchsizes, args.rounds, args.round_s, args.draws = (
            ["fc", "conv"],
            [8],
            1,
            0.0,
            4,
        )
    return args


class Budget:
    """A section's deadline: `fits(est)` says whether `est` more seconds fit before it."""

    def __init__(self, end):
        self.end = end

    def fits(self, est):
        return time.perf_counter() + est <= self.end


def deadlines(start, budget_s, sections=tuple(SHARES)):
    """section -> its Budget: it ends at the sum of the shares up to it (the chosen sections'
    shares, scaled to keep the 5% slack)."""
    out, total = {}, 0.0
    scale = sum(SHARES.values()) / sum(SHARES[s] for s in sections)
    for section in sections:
        total += SHARES[section] * scale
        out[section] = Budget(start + total * budget_s)
    return out


def _input(quick):
    return (8, 8, 3) if quick else CIFAR


def _batch(mesh, b, quick):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, *_input(quick))).astype(np.float32)
    return x, rng.integers(0, 10, b).astype(np.int32)


def _model(network, dtype, quick):
    if quick:  # tiny: the smoke run times nothing worth keeping
        return models.build_model(network, 10, n_hl=1, hl_size=16, width=4, dtype=dtype)
    return models.build_model(network, 10, dtype=dtype)  # full width (vgg/resnet: 64)


def timed_steps(mesh, network, dtype, variants, b, args):
    """Compiles and times `variants` (throughput.build_step's names) on one batch, alternating
    rounds; per variant: median ms, compile s, GFLOP per step, temp MB."""
    model = _model(network, dtype, args.quick)
    x, y = _batch(mesh, b, args.quick)
    batch = mesh_lib.global_batch(mesh, x, y)
    opt = optim.make_optimizer("sgd", 1e-3, 0.0)
    sigma = precision.default_sigma(network, dtype)
    runs = {}
    for v in variants:
        fn = throughput.build_step(v, model, opt, mesh, b, sigma)
        state = step_lib.init_state(model, opt, x, 0, mesh)
        compile_s, flops, temp_mb = throughput.compiled_costs(fn, state, batch)
        state, t = throughput.run_steps(fn, state, batch, 2)  # warm-up; sizes the rounds
        n = max(1, int(np.ceil(args.round_s / t)))
        runs[v] = dict(
            fn=fn, state=state, n=n, times=[], compile_s=compile_s, flops=flops, temp_mb=temp_mb
        )
    for _ in range(args.rounds):
        for r in runs.values():
            r["state"], t = throughput.run_steps(r["fn"], r["state"], batch, r["n"])
            r["times"].append(t)
    return {
        v: dict(
            step_ms=1e3 * statistics.median(r["times"]),
            compile_s=r["compile_s"],
            gflop_per_step=r["flops"] / 1e9,
            temp_mb=r["temp_mb"],
        )
        for v, r in runs.items()
    }


def precision_section(args, budget, emit):
    x = jax.random.normal(jax.random.key(1), (bf16_sigma.BATCH, 8, 8, 3))
    y = jnp.arange(bf16_sigma.BATCH) % 10
    measured = [n for n in ("fc", "conv", "vgg", "resnet") if n in args.networks]
    for network in measured[:1] if args.quick else measured:  # quick: one compile
        floor = precision.TF32_SIGMA_FLOOR[network]
        for sigma in (floor,) if args.quick else (floor, floor / 10):
            if not budget.fits(0):
                emit(
                    "precision",
                    dict(network=network, sigma=sigma, skipped="over the section's budget"),
                )
                continue
            highest, default = (
                models.build_model(network, 10, n_hl=2, hl_size=32, width=2, precision=p)
                for p in ("highest", "default")
            )
            params = highest.init(jax.random.key(0), x)["params"]
            hi, lo = bf16_sigma.mean_estimates([highest, default], params, x, y, sigma, args.draws)
            cos, r0, r1 = bf16_sigma.worst(lo, hi)
            emit(
                "precision",
                dict(
                    network=network,
                    sigma=sigma,
                    draws=args.draws,
                    at_floor=sigma == floor,
                    min_cosine=cos,
                    norm_ratio=[r0, r1],
                    ok=cos >= 0.99 and 0.85 <= r0 and r1 <= 1.15,
                ),
            )


def steps_section(mesh, args, budget, emit, peaks, networks, variants, dtypes, batches, section):
    cost = {}  # network -> seconds its last combination took: the estimate for the next
    # (a network not yet measured: the dearest so far, so one combination rarely overruns)
    for b in batches:
        for dtype in dtypes:
            for network in networks:
                where = dict(network=network, dtype=dtype, batchsize=b, input=_input(args.quick))
                if not budget.fits(cost.get(network, max(cost.values(), default=0.0))):
                    emit(section, dict(where, skipped="over the section's budget"))
                    continue
                start = time.perf_counter()
                try:
                    res = timed_steps(mesh, network, dtype, variants, b, args)
                except Exception as e:  # e.g. out of device memory: the next one may fit
                    emit(
                        section,
                        dict(where, skipped=f"{type(e).__name__}: {str(e).splitlines()[0]}"),
                    )
                    continue
                cost[network] = time.perf_counter() - start
                base = res[variants[0]]
                for v, r in res.items():
                    achieved = r["gflop_per_step"] / (r["step_ms"] / 1e3)
                    emit(
                        section,
                        dict(
                            where,
                            variant=v,
                            **r,
                            achieved_gflop_s=achieved,
                            mfu=achieved / peaks[dtype],
                            examples_per_s=b / r["step_ms"] * 1e3,
                            time_vs_first=r["step_ms"] / base["step_ms"],
                            temp_vs_first=r["temp_mb"] / base["temp_mb"],
                        ),
                    )


def run_section(emit, section, fn, *a):
    """Runs one section; an error becomes one `skipped` row and the next section still runs
    (a short GPU loan must not lose the whole suite to one failure)."""
    try:
        return fn(*a)
    except Exception as e:
        traceback.print_exc()  # the whole story on stderr, one line in the rows and the table
        first = (str(e).splitlines() or [""])[0]
        emit(section, dict(skipped=f"error: {type(e).__name__}: {first}"))


def run(args):
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    kind = jax.devices()[0].device_kind
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rows = []

    t0 = time.perf_counter()
    chosen = [s for s in SHARES if s in args.sections]
    budgets = deadlines(t0, args.budget_s, chosen)

    def emit(section, row):  # t_s: seconds into the suite, to size --budget_s by
        row = dict(
            section=section,
            device_kind=kind,
            date=date,
            quick=args.quick,
            **row,
            t_s=round(time.perf_counter() - t0, 1),
        )
        rows.append(row)
        files.append_jsonl(args.out, [row])
        print(files.json_text(row, indent=None), flush=True)

    def guarded(section, fn, *a):
        if section in chosen:
            return run_section(emit, section, fn, *a)

    guarded("precision", precision_section, args, budgets["precision"], emit)  # issue 22 first
    guarded("loop", loop_section, args, budgets["loop"], emit)
    # Large enough to saturate a GPU (8192: ~4 TFLOP per call); a CPU's peak shows at 2048.
    n = 256 if args.quick else 8192 if jax.default_backend() != "cpu" else 2048
    peaks = {}
    if {"steps", "noise"} & set(chosen):
        peaks = {
            "float32": throughput.matmul_peak(mesh, "float32", "highest", n),
            "bfloat16": throughput.matmul_peak(mesh, "bfloat16", None, n),
        }
    for dtype, gflop_s in peaks.items():
        emit("peak", dict(dtype=dtype, matmul_n=n, gflop_s=gflop_s))
    step_args = (mesh, args, budgets["steps"], emit, peaks, args.networks)
    guarded(
        "steps",
        steps_section,
        *step_args,
        ["sgd", "np-rademacher"],
        ["float32", "bfloat16"],
        args.batchsizes,
        "steps",
    )
    noise_nets = [n for n in ("fc", "conv") if n in args.networks][: 1 if args.quick else 2]
    guarded(
        "noise",
        steps_section,
        mesh,
        args,
        budgets["noise"],
        emit,
        peaks,
        noise_nets,
        ["np-rademacher", "np-gaussian"],
        ["float32"],
        args.batchsizes[-1:],
        "noise",
    )
    guarded("population", population_section, args, budgets["population"], emit)
    return rows


def main(argv=None):
    args = parse_args(argv)
    for path in (args.out, args.table):  # an unwritable output fails now, not after the run
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot create the folder of {path}: {e.strerror}") from None
    command = shlex.join(
        ["python", "benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
    )
    rows = run(args)
    text = table(rows, command)
    files.write_text(args.table, text)
    print(f"\n{text}\ntable: {args.table}\nrows: {args.out}")


if __name__ == "__main__":
    main()
