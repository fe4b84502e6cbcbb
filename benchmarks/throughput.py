"""Throughput of NP against SGD and two reference NP estimators, side by side in one run.

    python benchmarks/throughput.py                 # the full suite, 1 and 8 devices (minutes)
    python benchmarks/throughput.py --quick         # a smoke run (tests use it)

For every (network, input shape, global batch, device count), every variant below is compiled
(compile time reported apart), warmed up, then timed in alternating rounds (one round of each
variant, again and again) so machine drift hits all alike; the median round is reported.

Variants: `sgd`; this engine's NP for each noise kind and mode (`np-rademacher`,
`np-gaussian`, `np-rademacher-regen`, `np-gaussian-regen`, `np-rademacher-mb4`: 4 microbatches);
`naive` and `original` (benchmarks/references.py); on request, the variance-reduction options
(`np-antithetic`, `np-jvp`, `np-layerwise`, `np-draws4`, `np-layerwise-jvp`,
`np-layerwise-jvp-draws4`) and input decorrelation (`np-decorrelate`, `sgd-decorrelate`: the
model with --decorrelate's matrices and their rule's step; fc, linfc, conv, conv-large only). Per variant: median step time, examples/s
(total and per device), FLOPs per step and per device (XLA cost analysis), achieved FLOP/s
against the matmul peak of the same mesh measured in the same run (all devices at once), peak temp memory (XLA memory analysis), and the
ratios to SGD, naive and original (NP/naive compares like with like for `np-gaussian`: naive
draws Gaussian noise). Output: JSON lines (--out), a printed table, a PNG (--png).

On a machine without accelerators each device count runs in its own process with that many
simulated CPU devices; on GPUs the mesh takes the first N devices.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from nodepert_dist import cli, files
from nodepert_dist.models import NETWORKS

flags.DEFINE_list("networks", ["fc", "conv", "conv-large"], "Networks (models.NETWORKS).")
flags.DEFINE_integer("width", 16, "vgg/vgg16/resnet: channels of the first stage (64: full "
                     "VGG/ResNet-18).")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16 (NP's sigma: the "
                  "network's default, in bf16 its measured floor).")
flags.DEFINE_list("shapes", ["mnist", "cifar"], "Input shapes: mnist (28x28x1), cifar (32x32x3).")
flags.DEFINE_list("batchsizes", ["128", "1024"], "Global batch sizes (conv-large: 128 only).")
flags.DEFINE_list("devices", ["1", "8"], "Device counts.")
flags.DEFINE_list("variants", ["sgd", "np-rademacher", "np-gaussian", "np-rademacher-regen",
                               "np-gaussian-regen", "np-rademacher-mb4", "naive", "original"],
                  "What to time.")
flags.DEFINE_integer("rounds", 7, "Alternating rounds; the median round is reported, with the "
                     "interquartile range over the median as its spread.")
flags.DEFINE_float("round_s", 0.25, "Least seconds of steps per variant per round.")
flags.DEFINE_bool("quick", False, "Smoke run: fc at batch 128, 1 round, few variants.")
flags.DEFINE_bool("xla_cpu_conv_flag", True,
                  "CPU only: XLA_FLAGS --xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                  "(also the trainer's default on CPU; see docs/usage.md).")
flags.DEFINE_string("out", "benchmarks/results/throughput.jsonl", "JSON lines (appended).")
flags.DEFINE_string("png", "benchmarks/results/throughput.png", "Chart of the ratios ('' = none).")
flags.DEFINE_integer("worker_devices", 0, "Internal: time this many devices in this process.")
FLAGS = flags.FLAGS

SHAPES = {"mnist": (28, 28, 1), "cifar": (32, 32, 3)}
NP_VARIANTS = {  # name -> (noise, mode, microbatches)
    "np-rademacher": ("rademacher", "keep", 1), "np-gaussian": ("gaussian", "keep", 1),
    "np-rademacher-regen": ("rademacher", "regen", 1), "np-gaussian-regen": ("gaussian", "regen", 1),
    "np-rademacher-mb4": ("rademacher", "keep", 4),
}
# The variance-reduction options (Rademacher, keep), on request: --variants=sgd,np-antithetic,...
NP_OPTION_VARIANTS = {
    "np-antithetic": dict(np_antithetic=True), "np-jvp": dict(np_delta="jvp"),
    "np-layerwise": dict(np_layerwise=True), "np-draws4": dict(np_draws=4),
    "np-layerwise-jvp": dict(np_layerwise=True, np_delta="jvp"),
    "np-layerwise-jvp-draws4": dict(np_layerwise=True, np_delta="jvp", np_draws=4),
}
# --decorrelate (decorrelation.py), on request: name -> update rule.
DECORRELATE_VARIANTS = {"np-decorrelate": "np", "sgd-decorrelate": "sgd"}
# Every list is checked when the flags are parsed: a typo fails in one line, not in a worker.
cli.check_list("networks", NETWORKS)
cli.check_list("shapes", list(SHAPES))
cli.check_list("dtypes", ["float32", "bfloat16"])
cli.check_list("variants", ["sgd", *NP_VARIANTS, *NP_OPTION_VARIANTS, *DECORRELATE_VARIANTS,
                            "naive", "original"])
cli.check_list("batchsizes", pattern=cli.POSITIVE_INT, what="a positive integer")
cli.check_list("devices", pattern=cli.POSITIVE_INT, what="a positive integer")


def _configs():
    for network in FLAGS.networks:
        for shape in FLAGS.shapes:
            for b in map(int, FLAGS.batchsizes):
                if network in ("conv-large", "vgg", "vgg16", "resnet", "resnet34") and b > 128:
                    continue  # minutes per step on a CPU
                for dtype in FLAGS.dtypes:
                    yield network, shape, b, dtype


def matmul_peak(mesh, dtype="float32", precision=None, n=2048):
    """GFLOP/s of `dtype` matmuls (at `precision`: None is jax's default), the best of one
    device alone and every mesh device at once, measured now: the peak of this mesh's hardware
    (simulated CPU devices share its cores). Also benchmarks/gpu_suite.py's MFU reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from nodepert_dist.mesh import DATA, make_mesh
    reps = 4
    best = 0.0
    repeat = lambda a: jax.lax.fori_loop(
        0, reps, lambda i, b: (jnp.dot(b, a, precision=precision) / n).astype(dtype), a)
    for m in (make_mesh(mesh.devices.flat[:1]), mesh):
        a = jax.device_put(jnp.ones((m.devices.size * n, n), dtype), NamedSharding(m, P(DATA)))
        f = jax.jit(jax.shard_map(repeat,
                                  mesh=m, in_specs=P(DATA), out_specs=P(DATA)))
        f(a).block_until_ready()
        for _ in range(5):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = max(best, 2 * n ** 3 * reps * m.devices.size / (time.perf_counter() - t) / 1e9)
        if m.devices.size == mesh.devices.size:
            break
    return best


def compiled_costs(fn, state, batch):
    """Compiles `fn` for these arguments: (compile seconds, FLOPs per step per device from XLA's
    cost analysis, peak temp MB from its memory analysis)."""
    t0 = time.perf_counter()
    compiled = fn.lower(state, *batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    temp_mb = mem.temp_size_in_bytes / 2 ** 20 if mem else float("nan")
    return compile_s, float(cost.get("flops", 0.0)), temp_mb


def build_step(variant, model, opt, mesh, batch, sigma):
    import references

    from nodepert_dist import step as step_lib
    from nodepert_dist.estimator import NPSettings
    common = dict(loss="mse", seed=0, global_batch=batch)
    if variant == "sgd":
        return step_lib.make_train_step(model, opt, mesh, update_rule="sgd", **common)
    if variant in NP_VARIANTS:
        noise, mode, mb = NP_VARIANTS[variant]
        return step_lib.make_train_step(model, opt, mesh, update_rule="np", **common, np=NPSettings(
            sigma=sigma, noise=noise, np_mode=mode, np_microbatches=mb))
    if variant in NP_OPTION_VARIANTS:
        return step_lib.make_train_step(model, opt, mesh, update_rule="np", **common,
                                        np=NPSettings(sigma=sigma, **NP_OPTION_VARIANTS[variant]))
    if variant in DECORRELATE_VARIANTS:  # the default rate: its cost, not its value
        return step_lib.make_train_step(model, opt, mesh, update_rule=DECORRELATE_VARIANTS[variant],
                                        decorrelate_lr=1e-4, **common, np=NPSettings(sigma=sigma))
    ref = {"naive": references.naive_np, "original": references.original_np}[variant]
    return step_lib.make_train_step(model, opt, mesh, gradient=ref(sigma=sigma, **common),
                                    global_batch=batch)


def _spread(times):
    """Interquartile range over the median (nan for a single round)."""
    if len(times) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def run_steps(fn, state, batch, n):
    import jax
    start = time.perf_counter()
    for _ in range(n):
        state, m = fn(state, *batch)
    jax.block_until_ready((state, m))
    return state, (time.perf_counter() - start) / n


def worker(n_dev: int) -> None:
    """Times every config on a mesh of `n_dev` devices; appends JSON lines to --out."""
    import jax
    import numpy as np

    from nodepert_dist import decorrelation, models, optim, precision
    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import step as step_lib

    if jax.device_count() < n_dev:
        raise SystemExit(f"error: --devices asks for {n_dev} devices, this machine has "
                         f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    mesh = mesh_lib.make_mesh(jax.devices()[:n_dev])
    peak = matmul_peak(mesh)
    kind = jax.devices()[0].device_kind
    for network, shape, b, dtype in _configs():
        if b % n_dev:
            continue
        rng = np.random.default_rng(0)
        x = rng.normal(size=(b,) + SHAPES[shape]).astype(np.float32)
        y = rng.integers(0, 10, b).astype(np.int32)
        batch = mesh_lib.global_batch(mesh, x, y)
        model = models.build_model(network, 10, width=FLAGS.width, dtype=dtype)
        opt = optim.make_optimizer("sgd", 1e-3, 0.0)
        runs = {}
        for variant in FLAGS.variants:
            if variant.endswith("-mb4") and (b // n_dev) % 4:
                continue
            vmodel = model
            if variant in DECORRELATE_VARIANTS:
                if network not in decorrelation.NETWORKS:
                    continue
                vmodel = models.build_model(network, 10, width=FLAGS.width, dtype=dtype,
                                            decorrelate=True)
            fn = build_step(variant, vmodel, opt, mesh, b, precision.default_sigma(network, dtype))
            state = step_lib.init_state(vmodel, opt, x, 0, mesh)
            compile_s, flops, temp_mb = compiled_costs(fn, state, batch)
            state, t = run_steps(fn, state, batch, 2)  # warm-up; also sizes the rounds
            runs[variant] = {"fn": fn, "state": state, "times": [], "compile_s": compile_s,
                             "n": max(1, math.ceil(FLAGS.round_s / t)), "flops": flops,
                             "temp_mb": temp_mb}
        for _ in range(FLAGS.rounds):
            for r in runs.values():
                r["state"], t = run_steps(r["fn"], r["state"], batch, r["n"])
                r["times"].append(t)
        step_s = {v: statistics.median(r["times"]) for v, r in runs.items()}
        spread = {v: _spread(r["times"]) for v, r in runs.items()}
        for variant, r in runs.items():
            t = step_s[variant]
            row = {"network": network, "shape": shape, "batchsize": b, "devices": n_dev,
                   "dtype": dtype, "width": FLAGS.width if network.startswith(("vgg", "resnet"))
                   else None,
                   "variant": variant, "device_kind": kind, "step_ms": 1e3 * t,
                   "step_iqr_over_median": spread[variant], "rounds": len(r["times"]),
                   "examples_per_s": b / t, "examples_per_s_per_device": b / t / n_dev,
                   "compile_s": r["compile_s"], "gflop_per_step_per_device": r["flops"] / 1e9,
                   "achieved_gflop_s": r["flops"] * n_dev / t / 1e9, "matmul_peak_gflop_s": peak,
                   "temp_mb": r["temp_mb"], "steps_per_round": r["n"],
                   "xla_cpu_conv_flag": FLAGS.xla_cpu_conv_flag}
            for ref in ("sgd", "naive", "original"):
                if ref in step_s and variant != ref:
                    row[f"time_vs_{ref}"] = t / step_s[ref]
            if "sgd" in runs and variant != "sgd":
                row["temp_vs_sgd"] = r["temp_mb"] / runs["sgd"]["temp_mb"]
            files.append_jsonl(FLAGS.out, [row])
        print(f"done: {network} {shape} B={b} {dtype} on {n_dev} device(s)", flush=True)


def report(rows) -> None:
    """The printed table and the PNG chart of the NP/SGD time and memory ratios."""
    head = (f"{'network':<11}{'shape':<6}{'B':>5}{'dev':>4} {'dtype':<5} {'variant':<20}{'ms':>9}{'±':>5}{'ex/s':>9}"
            f"{'ex/s/dev':>9}{'comp s':>7}{'GFLOP':>8}{'%peak':>6}{'MB':>7}"
            f"{'/sgd':>6}{'/naive':>7}{'/orig':>6}{'mem/sgd':>8}")
    print(head)
    fmt = lambda v, w, p: f"{v:>{w}.{p}f}" if isinstance(v, float) else " " * (w - 1) + "-"
    for r in rows:
        print(f"{r['network']:<11}{r['shape']:<6}{r['batchsize']:>5}{r['devices']:>4} "
              f"{r.get('dtype', 'float32')[:4]:<5} {r['variant']:<20}{r['step_ms']:>9.2f}{fmt(r['step_iqr_over_median'], 5, 2)}"
              f"{r['examples_per_s']:>9.0f}"
              f"{r['examples_per_s_per_device']:>9.0f}{r['compile_s']:>7.1f}"
              f"{r['gflop_per_step_per_device']:>8.3f}"
              f"{100 * r['achieved_gflop_s'] / r['matmul_peak_gflop_s']:>6.0f}"
              f"{r['temp_mb']:>7.1f}{fmt(r.get('time_vs_sgd'), 6, 2)}{fmt(r.get('time_vs_naive'), 7, 2)}"
              f"{fmt(r.get('time_vs_original'), 6, 2)}{fmt(r.get('temp_vs_sgd'), 8, 2)}")
    if not FLAGS.png:
        return
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key_of = lambda r: (r["network"], r["shape"], r["batchsize"], r["devices"],
                        r.get("dtype", "float32"))
    configs = sorted({key_of(r) for r in rows})
    variants = [v for v in FLAGS.variants if v != "sgd"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(configs)), 8), sharex=True)
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        for ax, key in zip(axes, ("time_vs_sgd", "temp_vs_sgd")):
            vals = [next((r.get(key, float("nan")) for r in rows if r["variant"] == v and
                          key_of(r) == c), float("nan"))
                    for c in configs]
            ax.bar([j + i * width for j in range(len(configs))], vals, width, label=v)
    for ax, title in zip(axes, ("step time / SGD step time", "peak temp memory / SGD's")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axes[0].legend(fontsize=7, ncol=4)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
    axes[1].set_xticklabels([f"{n}\n{s} B{b}\n{d} dev" + ("\nbf16" if t == "bfloat16" else "")
                             for n, s, b, d, t in configs], fontsize=7)
    fig.suptitle(f"NP vs SGD, {rows[0]['device_kind']}")
    fig.tight_layout()
    with files.atomic_open(FLAGS.png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    print(f"chart: {FLAGS.png}")


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.quick:
        FLAGS.networks, FLAGS.shapes, FLAGS.batchsizes = ["fc"], ["mnist"], ["128"]
        FLAGS.variants, FLAGS.rounds, FLAGS.round_s = ["sgd", "np-rademacher", "naive", "original"], 1, 0.0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for references.py
    if FLAGS.worker_devices:
        from nodepert_dist import mesh as mesh_lib
        if FLAGS.xla_cpu_conv_flag:
            mesh_lib.tune_cpu_convolutions()
        # Only the CPU backend is split; on GPUs the mesh takes the first N GPUs.
        mesh_lib.simulate_cpu_devices(FLAGS.worker_devices)
        worker(FLAGS.worker_devices)
        return
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    start = len(files.read_jsonl(FLAGS.out))  # rows of earlier runs, not this one's
    for n in map(int, FLAGS.devices):
        # A process per device count: simulated CPU devices are fixed at start-up.
        args = [a for a in sys.argv[1:] if not a.startswith("--worker_devices")]
        code = subprocess.call([sys.executable, os.path.abspath(__file__), *args,
                                f"--worker_devices={n}"])
        if code:
            raise SystemExit(f"error: the {n}-device run failed (exit {code})")
    rows = files.read_jsonl(FLAGS.out)[start:]
    report(rows)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("benchmarks/throughput.py"))
