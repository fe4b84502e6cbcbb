"""Checkpoint cost in the train loop: conv-large NP steps with and without async saves.

    PYTHONPATH=. python benchmarks/checkpoint_overhead.py --network=conv-large --batchsize=64 \
        --cpu_devices=8 --steps=16 --every=2

Times `steps` train steps (after warm-up, ending with block_until_ready) three ways, in one
process: no checkpoints; a save every `every` steps; and the same saves made synchronous
(save + wait). Prints the per-save numbers logged by nodepert_dist.checkpoint as well.
"""

import statistics
import tempfile
import time

import jax
import numpy as np

from nodepert_dist import cli, models, precision


def main():
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="conv-large", choices=models.NETWORKS)
    ap.add_argument("--batchsize", type=int, default=64)
    ap.add_argument("--cpu_devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from absl import logging

    logging.set_verbosity(logging.INFO)
    from nodepert_dist import checkpoint, optim
    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import step as step_lib
    from nodepert_dist.estimator import NPSettings

    mesh = mesh_lib.make_mesh()
    shape = (28, 28, 1) if args.network.startswith("conv") else (784,)
    model = models.build_model(args.network, 10, 2, 500)
    optimizer = optim.make_optimizer("sgd", 1e-2, 0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batchsize, *shape)).astype(np.float32)
    y = rng.integers(0, 10, args.batchsize).astype(np.int32)
    state = step_lib.init_state(model, optimizer, x, 0, mesh)
    train_step = step_lib.make_train_step(
        model,
        optimizer,
        mesh,
        update_rule="np",
        loss="mse",
        seed=0,
        global_batch=args.batchsize,
        np=NPSettings(sigma=precision.default_sigma(args.network)),
    )
    batch = mesh_lib.global_batch(mesh, x, y)
    t = time.perf_counter()
    state, _ = train_step(state, *batch)
    jax.block_until_ready(state)
    print(f"compile + first step: {time.perf_counter() - t:.2f} s")

    def run(mode, directory):
        nonlocal state
        saver = checkpoint.Checkpointer(directory, keep=2) if mode != "none" else None
        t = time.perf_counter()
        for i in range(1, args.steps + 1):
            state, _ = train_step(state, *batch)
            if saver and i % args.every == 0:
                saver.save(int(i), state, meta={})
                if mode == "sync":
                    saver.wait()
        jax.block_until_ready(state)
        loop = time.perf_counter() - t
        if saver:
            saver.wait()
        return loop, time.perf_counter() - t

    results = {m: [] for m in ("none", "async", "sync")}
    for _ in range(args.repeats):
        for mode in results:
            with tempfile.TemporaryDirectory() as d:
                results[mode].append(run(mode, d))
    for mode, r in results.items():
        loop = statistics.median(a for a, _ in r)
        total = statistics.median(b for _, b in r)
        print(
            f"{mode:>5}: {args.steps} steps {loop:.3f} s ({1e3 * loop / args.steps:.1f} ms/step), "
            f"with the final wait {total:.3f} s; saves: {args.steps // args.every if mode != 'none' else 0}"
        )


if __name__ == "__main__":
    main()
