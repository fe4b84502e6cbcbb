"""Compile time of the NP train step against SGD's, per network and per estimator option.

    python benchmarks/compile_time.py                                  # the zoo, NP vs SGD
    python benchmarks/compile_time.py --networks=vgg16 --variants=all  # every option
    python benchmarks/compile_time.py --quick                          # a smoke run (tests)

Each (network, variant) builds the jitted train step (step.make_train_step, as the trainer does)
and times its three stages apart: trace (Python: flax and jax tracing to a jaxpr), lower (the
jaxpr to StableHLO) and compile (XLA); with the size of the traced and lowered programs (jaxpr
equations, StableHLO ops), XLA's peak temp memory (memory_analysis), and the process's CPU
seconds for all three (steadier than wall time on a shared machine). Nothing is run. One
process, one device; a tiny compile first, so the first row does not pay jax's start-up.
Timings drift with the machine's load: each variant is measured --repeats times in alternating
rounds and the fastest kept; compare NP and SGD of the same run (the `/sgd` columns).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from nodepert_dist import cli, files
from nodepert_dist.models import NETWORKS

SHAPES = {"mnist": (28, 28, 1), "cifar": (32, 32, 3)}
# name -> NPSettings fields (update rule np), Rademacher noise and keep mode unless named.
VARIANTS = {
    "np": {},
    "np-regen": dict(np_mode="regen"),
    "np-gaussian": dict(noise="gaussian"),
    "np-mb4": dict(np_microbatches=4),
    "np-antithetic": dict(np_antithetic=True),
    "np-jvp": dict(np_delta="jvp"),
    "np-draws4": dict(np_draws=4),
    "np-layerwise": dict(np_layerwise=True),
    "np-layerwise-jvp": dict(np_layerwise=True, np_delta="jvp"),
    "np-local": dict(np_local=True),
    "np-decorrelate": {},  # the model with --decorrelate's matrices
    "original": dict(np_estimator="original"),
    "shared_noise": dict(np_estimator="shared_noise"),
}
LOCAL_NETWORKS = ("fc", "linfc", "conv", "conv-large")  # models.build_model(local_heads=True)

flags.DEFINE_list("networks", list(NETWORKS), "Networks (models.NETWORKS).")
flags.DEFINE_list("variants", ["sgd", "np"], "sgd and VARIANTS' names, or 'all'.")
flags.DEFINE_enum("shape", "cifar", list(SHAPES), "Input shape.")
flags.DEFINE_integer("batchsize", 128, "Batch size (one device).")
flags.DEFINE_integer("width", 16, "vgg/vgg16/resnet*: channels of the first stage.")
flags.DEFINE_integer(
    "repeats",
    2,
    "Rounds of every variant; the fastest (trace + lower + compile) "
    "is reported: other work on the machine only ever adds time.",
)
flags.DEFINE_bool("quick", False, "Smoke run: fc, sgd and np.")
flags.DEFINE_string("out", "benchmarks/results/compile_time.jsonl", "JSON lines (appended).")
FLAGS = flags.FLAGS
cli.check_list("networks", NETWORKS)
cli.check_list("variants", ["all", "sgd", *VARIANTS])


def _applies(variant: str, network: str) -> bool:
    from nodepert_dist import decorrelation

    if variant == "np-local":
        return network in LOCAL_NETWORKS
    if variant == "np-decorrelate":
        return network in decorrelation.NETWORKS
    return True


def build(network: str, variant: str, mesh, x):
    """(the jitted train step, its state, CPU s to initialise it) of this variant, as the
    trainer builds them."""
    import jax

    from nodepert_dist import models, optim, precision
    from nodepert_dist import step as step_lib
    from nodepert_dist.estimator import NPSettings

    settings = dict(VARIANTS.get(variant, {}))
    model = models.build_model(
        network,
        10,
        width=FLAGS.width,
        local_heads=settings.get("np_local", False),
        decorrelate=variant == "np-decorrelate",
    )
    opt = optim.make_optimizer("sgd", 1e-3, 0.0)
    np_settings = NPSettings(sigma=precision.default_sigma(network), **settings)
    fn = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule="sgd" if variant == "sgd" else "np",
        loss="mse",
        seed=0,
        global_batch=x.shape[0],
        np=np_settings,
        decorrelate_lr=1e-4 if variant == "np-decorrelate" else None,
    )
    cpu0 = time.process_time()
    state = jax.block_until_ready(step_lib.init_state(model, opt, x, 0, mesh))
    return fn, state, time.process_time() - cpu0  # the run's start-up: init compiles too


def jaxpr_size(jaxpr) -> int:
    """Equations of a jaxpr, those of the jaxprs inside its equations (shard_map, jit, scan,
    custom rules) included: the size of what was traced."""
    from jax.extend import core

    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, core.ClosedJaxpr):
                    n += jaxpr_size(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    n += jaxpr_size(sub)
    return n


def measure(network: str, variant: str, mesh, x, y) -> dict:
    """Trace, lower and compile seconds, StableHLO ops and temp MB of one variant's step."""
    from nodepert_dist import mesh as mesh_lib

    fn, state, init_cpu_s = build(network, variant, mesh, x)
    batch = mesh_lib.global_batch(mesh, x, y)
    cpu0, t0 = time.process_time(), time.perf_counter()
    traced = fn.trace(state, *batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3, cpu3 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()
    ops = sum(" = " in line for line in lowered.as_text().splitlines())
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": cpu3 - cpu0,  # this process's CPU seconds (XLA's threads included)
        "jaxpr_eqns": jaxpr_size(traced.jaxpr.jaxpr),
        "hlo_ops": ops,
        "temp_mb": mem.temp_size_in_bytes / 2**20 if mem else float("nan"),
        "init_cpu_s": init_cpu_s,  # the parameters' initialisation (compile included)
    }


def report(rows) -> None:
    print(
        f"{'network':<11}{'variant':<18}{'trace':>7}{'lower':>7}{'XLA':>7}{'total':>7}"
        f"{'/sgd':>6}{'cpu s':>7}{'/sgd':>6}{'eqns':>7}{'ops':>7}{'MB':>8}{'mem/sgd':>8}"
    )
    fmt = lambda v, w: f"{v:>{w}.2f}" if isinstance(v, float) else " " * (w - 1) + "-"
    for r in rows:
        print(
            f"{r['network']:<11}{r['variant']:<18}{r['trace_s']:>7.2f}{r['lower_s']:>7.2f}"
            f"{r['compile_s']:>7.2f}{r['total_s']:>7.2f}{fmt(r.get('total_vs_sgd'), 6)}"
            f"{r['cpu_s']:>7.2f}{fmt(r.get('cpu_vs_sgd'), 6)}"
            f"{r['jaxpr_eqns']:>7}{r['hlo_ops']:>7}{r['temp_mb']:>8.1f}{fmt(r.get('temp_vs_sgd'), 8)}"
            f"{r['init_cpu_s']:>7.2f}"
        )


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    from nodepert_dist import mesh as mesh_lib

    mesh_lib.tune_cpu_convolutions()  # the trainer's CPU default (no-op elsewhere)
    import jax
    import numpy as np

    if FLAGS.quick:
        FLAGS.networks, FLAGS.variants, FLAGS.shape = ["fc"], ["sgd", "np"], "mnist"
        FLAGS.repeats = 1
    variants = ["sgd", *VARIANTS] if "all" in FLAGS.variants else FLAGS.variants
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batchsize,) + SHAPES[FLAGS.shape]).astype(np.float32)
    y = rng.integers(0, 10, FLAGS.batchsize).astype(np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    measure("fc", "sgd", mesh, x[:8], y[:8])  # jax's one-time start-up, not timed
    rows = []
    for network in FLAGS.networks:
        todo = [v for v in variants if _applies(v, network)]
        best = {}
        for _ in range(FLAGS.repeats):  # rounds of every variant: drift hits them alike
            for variant in todo:
                m = measure(network, variant, mesh, x, y)
                if variant not in best or m["total_s"] < best[variant]["total_s"]:
                    best[variant] = m
        sgd = best.get("sgd")
        for variant in todo:
            row = {
                "network": network,
                "variant": variant,
                "shape": FLAGS.shape,
                "batchsize": FLAGS.batchsize,
                "width": FLAGS.width,
                "repeats": FLAGS.repeats,
                "device_kind": jax.devices()[0].device_kind,
                **best[variant],
            }
            if sgd is not None and variant != "sgd":
                row["total_vs_sgd"] = row["total_s"] / sgd["total_s"]
                row["compile_vs_sgd"] = row["compile_s"] / sgd["compile_s"]
                row["cpu_vs_sgd"] = row["cpu_s"] / sgd["cpu_s"]
                row["temp_vs_sgd"] = row["temp_mb"] / sgd["temp_mb"]
            files.append_jsonl(FLAGS.out, [row])
            rows.append(row)
        print(f"done: {network}", flush=True)
    report(rows)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("benchmarks/compile_time.py"))
