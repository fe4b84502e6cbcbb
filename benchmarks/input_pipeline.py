"""Input pipeline throughput vs the train step's consumption rate.

    python benchmarks/input_pipeline.py --make_synthetic=/tmp/synth          # once: CIFAR-shaped stores
    python benchmarks/input_pipeline.py --cpu_devices=8 --data_dir=data --synthetic_dir=/tmp/synth
    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        .venv/bin/python benchmarks/input_pipeline.py --data_dir=data --synthetic_dir=/tmp/synth --step_networks=

For each dataset, with and without augmentation, and for each prefetch mode (`threads`: Grain's
threaded prefetch in the process; `workersN`: N Grain worker processes) it reports examples/s of
- `host`: the pipeline alone (shuffle, gather the process's rows from the memory-mapped store,
  augment), every process iterating its share of the global batches, and
- `to device`: the same plus `make_array_from_process_local_data` (uint8) and the on-device
  preprocessing (uint8 -> float32), one batch in flight as in the train loop.
Each configuration runs --repeats times (host and to-device alternating) and reports the median.
Rates are for the whole job (global examples / slowest process's time). Next to them: the
train step's consumption rate (NP, same global batch and mesh) for `--step_networks` on the
dataset shapes. A dataset is read from --data_dir if converted there, else from --synthetic_dir
(random images of the real shape: the pipeline's cost does not depend on pixel values).
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

from nodepert_dist import cli, files
from nodepert_dist.models import NETWORKS

flags.DEFINE_string("data_dir", "data", "Where converted real datasets live.")
flags.DEFINE_string("synthetic_dir", "", "Where --make_synthetic wrote random stores.")
flags.DEFINE_string(
    "make_synthetic", "", "Write random stores of every dataset's shape here, exit."
)
flags.DEFINE_list("datasets", ["mnist", "cifar10", "cifar100"], "Datasets to measure.")
flags.DEFINE_list("prefetch", ["threads", "workers2"], "threads and/or workersN.")
flags.DEFINE_integer("batchsize", 128, "Global batch size.")
flags.DEFINE_integer("steps", 300, "Batches timed per run (after 10 warm-up batches).")
flags.DEFINE_integer("repeats", 3, "Runs per configuration; the median is reported.")
flags.DEFINE_list("step_networks", ["fc", "conv-large"], "Train steps to time (NP).")
flags.DEFINE_integer("step_steps", 5, "Train steps timed per network (after warm-up).")
flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices.")
flags.DEFINE_string("out", "benchmarks/results/input_pipeline.jsonl", "JSON lines output.")
FLAGS = flags.FLAGS

SHAPES = {
    "mnist": ((60000, 28, 28, 1), 10000, 10),
    "fmnist": ((60000, 28, 28, 1), 10000, 10),
    "cifar10": ((50000, 32, 32, 3), 10000, 10),
    "cifar100": ((50000, 32, 32, 3), 10000, 100),
}
cli.check_list("datasets", list(SHAPES))
cli.check_list("prefetch", pattern=f"threads|workers{cli.POSITIVE_INT}", what="threads or workersN")
cli.check_list("step_networks", NETWORKS)


def make_synthetic(root: str) -> None:
    import numpy as np

    from nodepert_dist.data import store
    from nodepert_dist.data.raw import Raw

    rng = np.random.default_rng(0)
    for name, (shape, n_test, classes) in SHAPES.items():
        img = lambda n: rng.integers(0, 256, (n, *shape[1:]), dtype=np.uint8)  # noqa: B023 (called here)
        lab = lambda n: rng.integers(0, classes, n).astype(np.int32)  # noqa: B023
        store.write(
            Raw(img(shape[0]), lab(shape[0]), img(n_test), lab(n_test), classes),
            store.store_dir(root, name),
            {"dataset": name, "verified": False, "checksum_problem": "synthetic benchmark data"},
        )
        print(f"{name}: {shape} -> {store.store_dir(root, name)}")


def _open(name):
    from nodepert_dist.data import store

    for root in (FLAGS.data_dir, FLAGS.synthetic_dir):
        if root and os.path.exists(os.path.join(store.store_dir(root, name), "meta.json")):
            return store.open_dataset(name, root), root != FLAGS.data_dir
    raise SystemExit(
        f"error: {name} is neither in --data_dir nor in --synthetic_dir; "
        f"run with --make_synthetic=DIR first"
    )


def _job_rate(n_examples: float, seconds: float) -> float:
    """Global examples/s: the slowest process sets the pace."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return n_examples / seconds
    from jax.experimental import multihost_utils

    return n_examples / float(np.max(multihost_utils.process_allgather(np.float64(seconds))))


def measure_pipeline(data, augment, prefetch, mesh, prep):
    import jax

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist.data import pipeline

    workers = int(prefetch[len("workers") :]) if prefetch.startswith("workers") else 0
    rates = {"host": [], "to device": []}
    for mode in [m for _ in range(FLAGS.repeats) for m in rates]:
        batches = pipeline.train_batches(
            data.train_x,
            data.train_y,
            global_batch=FLAGS.batchsize,
            seed=0,
            epoch=1,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            augment=augment,
        )
        it = pipeline.iterate(batches, workers=workers)
        pending = None
        for i in range(10 + FLAGS.steps):
            if i == 10:
                start = time.perf_counter()
            x, y = next(it)
            if mode == "to device":
                out = prep(mesh_lib.global_batch(mesh, x, y)[0])
                if pending is not None:
                    jax.block_until_ready(pending)
                pending = out
        if pending is not None:
            jax.block_until_ready(pending)
        rates[mode].append(_job_rate(FLAGS.steps * FLAGS.batchsize, time.perf_counter() - start))
        del it
    return {mode: statistics.median(r) for mode, r in rates.items()}


def measure_step(network, shape, classes, mesh):
    import jax
    import numpy as np

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import models, optim, precision
    from nodepert_dist import step as step_lib
    from nodepert_dist.estimator import NPSettings

    model = models.build_model(network, classes)
    opt = optim.make_optimizer("sgd", 1e-3, 0.0)
    x = np.random.default_rng(0).normal(size=(FLAGS.batchsize, *shape)).astype(np.float32)
    y = np.zeros(FLAGS.batchsize, np.int32)
    state = step_lib.init_state(model, opt, x[:1], 0, mesh)
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule="np",
        loss="mse",
        seed=0,
        global_batch=FLAGS.batchsize,
        np=NPSettings(sigma=precision.default_sigma(network)),
    )
    batch = mesh_lib.global_batch(mesh, x, y)
    state, m = step(state, *batch)
    state, m = step(state, *batch)
    jax.block_until_ready((state, m))
    start = time.perf_counter()
    for _ in range(FLAGS.step_steps):
        state, m = step(state, *batch)
    jax.block_until_ready((state, m))
    return FLAGS.step_steps * FLAGS.batchsize / (time.perf_counter() - start)


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.make_synthetic:
        make_synthetic(FLAGS.make_synthetic)
        return
    from nodepert_dist import distributed
    from nodepert_dist import mesh as mesh_lib

    if FLAGS.cpu_devices:
        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    mesh_lib.tune_cpu_convolutions()  # as nodepert-train does by default
    distributed.initialize()
    import jax

    from nodepert_dist.data import preprocess

    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch(FLAGS.batchsize, mesh)
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    layout = f"{jax.process_count()} process(es) x {jax.local_device_count()} {jax.devices()[0].platform} devices"
    say(f"{layout}, global batch {FLAGS.batchsize}, {os.cpu_count()} CPU cores")
    say(f"{'dataset':<10}{'augment':<9}{'prefetch':<10}{'host ex/s':>11}{'to device ex/s':>16}")
    results, shapes = [], {}
    for name in FLAGS.datasets:
        data, synthetic = _open(name)
        shapes[name] = (tuple(data.train_x.shape[1:]), data.num_classes)
        mode = preprocess.resolve("auto", name)
        prep = preprocess.device_fn(
            mode, preprocess.statistics(data.root, data.train_x, mode, 0, len(data.train_y)), mesh
        )
        for augment in (False, True):
            for prefetch in FLAGS.prefetch:
                r = measure_pipeline(data, augment, prefetch, mesh, prep)
                say(
                    f"{name + ('*' if synthetic else ''):<10}{str(augment):<9}{prefetch:<10}"
                    f"{r['host']:>11.0f}{r['to device']:>16.0f}"
                )
                results.append(
                    {
                        "kind": "pipeline",
                        "dataset": name,
                        "synthetic": synthetic,
                        "augment": augment,
                        "prefetch": prefetch,
                        **r,
                    }
                )
    for network in FLAGS.step_networks:
        name = "mnist" if network in ("fc", "linfc") else "cifar10"
        shape, classes = shapes.get(name) or (SHAPES[name][0][1:], SHAPES[name][2])
        rate = measure_step(network, shape, classes, mesh)
        say(f"train step (NP) {network} on {shape}: {rate:.0f} ex/s")
        results.append({"kind": "step", "network": network, "shape": list(shape), "ex_per_s": rate})
    say("* synthetic data of the real shape")
    if lead:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        files.append_jsonl(
            FLAGS.out, [{"layout": layout, "batchsize": FLAGS.batchsize, **r} for r in results]
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("benchmarks/input_pipeline.py"))
