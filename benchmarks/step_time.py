"""NP vs SGD step time on the same model, batch and mesh, measured side by side.

    python benchmarks/step_time.py --cpu_devices=8 --networks=fc,conv --batchsize=128

Both steps are compiled first (compile time reported apart), then timed in alternating rounds
(NP round, SGD round, ...) so machine drift hits both alike; each round times `--steps` steps
after `block_until_ready`, and the median round is reported. Also: examples/s, per-device
examples/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s and peak temp memory.
Results go to stdout as a table and to --out as JSON lines.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_list("networks", ["fc", "conv"], "Networks to time.")
flags.DEFINE_integer("batchsize", 128, "Global batch size.")
flags.DEFINE_integer("steps", 20, "Steps per timed round.")
flags.DEFINE_integer("rounds", 5, "Alternating NP/SGD rounds; the median round is reported.")
flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices.")
flags.DEFINE_enum("noise", "gaussian", ["gaussian", "rademacher"], "NP noise distribution.")
flags.DEFINE_string("out", "benchmarks/results/step_time.jsonl", "JSON lines output.")
FLAGS = flags.FLAGS


def _timed_round(step, state, batch, n):
    jax = __import__("jax")
    start = time.perf_counter()
    for _ in range(n):
        state, m = step(state, *batch)
    jax.block_until_ready((state, m))
    return state, (time.perf_counter() - start) / n


def main(argv):
    del argv
    from nodepert_dist import mesh as mesh_lib
    if FLAGS.cpu_devices:
        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    import jax
    import numpy as np
    from nodepert_dist import models, step as step_lib

    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch(FLAGS.batchsize, mesh)
    n_dev = mesh.devices.size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batchsize, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, FLAGS.batchsize).astype(np.int32)
    batch = mesh_lib.global_batch(mesh, x, y)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    print(f"{jax.devices()[0].device_kind} x {n_dev}, global batch {FLAGS.batchsize}")
    print(f"{'network':<11}{'rule':<5}{'step ms':>9}{'ex/s':>10}{'ex/s/dev':>10}"
          f"{'compile s':>10}{'GFLOP/step':>11}{'GFLOP/s':>9}{'temp MB':>9}")
    for network in FLAGS.networks:
        model = models.build_model(network, 10)
        opt = step_lib.make_optimizer("sgd", 1e-3, 0.0)
        runs = {}
        for rule in ("np", "sgd"):
            state = step_lib.init_state(model, opt, x, 0, mesh)
            step = step_lib.make_train_step(
                model, opt, mesh, update_rule=rule, loss="mse", sigma=models.default_sigma(network),
                seed=0, global_batch=FLAGS.batchsize, noise=FLAGS.noise)
            t0 = time.perf_counter()
            compiled = step.lower(state, *batch).compile()
            compile_s = time.perf_counter() - t0
            cost = compiled.cost_analysis() or {}
            cost = cost[0] if isinstance(cost, list) else cost
            mem = compiled.memory_analysis()
            state, _ = _timed_round(step, state, batch, 3)  # warm-up
            runs[rule] = {"step": step, "state": state, "times": [], "compile_s": compile_s,
                          "flops": float(cost.get("flops", 0.0)),
                          "temp_mb": (mem.temp_size_in_bytes / 2**20) if mem else float("nan")}
        for _ in range(FLAGS.rounds):
            for rule, r in runs.items():
                r["state"], t = _timed_round(r["step"], r["state"], batch, FLAGS.steps)
                r["times"].append(t)
        for rule, r in runs.items():
            t = statistics.median(r["times"])
            row = {"network": network, "update_rule": rule, "devices": n_dev,
                   "batchsize": FLAGS.batchsize, "step_s": t, "examples_per_s": FLAGS.batchsize / t,
                   "examples_per_s_per_device": FLAGS.batchsize / t / n_dev,
                   "compile_s": r["compile_s"], "flops_per_step": r["flops"],
                   "flop_per_s": r["flops"] / t, "temp_mb": r["temp_mb"], "noise": FLAGS.noise,
                   "device_kind": jax.devices()[0].device_kind}
            print(f"{network:<11}{rule:<5}{1e3 * t:>9.2f}{row['examples_per_s']:>10.0f}"
                  f"{row['examples_per_s_per_device']:>10.0f}{r['compile_s']:>10.2f}"
                  f"{r['flops'] / 1e9:>11.3f}{row['flop_per_s'] / 1e9:>9.1f}{r['temp_mb']:>9.1f}")
            with open(FLAGS.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        ratio = statistics.median(runs["np"]["times"]) / statistics.median(runs["sgd"]["times"])
        print(f"{network}: NP / SGD step time = {ratio:.2f}")


if __name__ == "__main__":
    app.run(main)
