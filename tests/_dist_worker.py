"""Test harness: `nodepert-train` in every process, printing the metric rows of *every* process.

train.main prints only from process 0; the tests need each process's view to check that all
processes agree on every metric. Same flags as nodepert-train (plus the distributed ones).
It also prints, per process, the operand shapes of each all-reduce in its compiled train step
(`ALLREDUCE rank [[shape, ...], ...]`: the step's cross-process sums, allreduce.py).
"""

import json
import sys

from absl import app

from nodepert_dist import config, distributed, train


def main(argv):
    del argv
    if config.FLAGS.cpu_devices > 0:
        import jax

        jax.config.update("jax_num_cpu_devices", config.FLAGS.cpu_devices)
    distributed.initialize_from_flags()
    import jax

    cfg = config.from_flags()
    print(f"ALLREDUCE {jax.process_index()} {json.dumps(all_reduces(cfg))}", flush=True)
    rows = train.train(cfg)
    print(f"ROWS {jax.process_index()} {json.dumps(rows)}", flush=True)
    sys.stdout.flush()


def all_reduces(cfg) -> list:
    """The all-reduce operand shapes of the run's train step, compiled (not run) as train runs it."""
    import jax
    from test_allreduce import all_reduce_operands

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import run_setup

    built = run_setup.build(cfg, mesh_lib.make_mesh())
    batch = jax.ShapeDtypeStruct(
        (cfg.batchsize, *built.data.train_x.shape[1:]),
        jax.numpy.float32,
        sharding=mesh_lib.batch_sharding(built.mesh),
    )
    labels = jax.ShapeDtypeStruct((cfg.batchsize,), jax.numpy.int32, sharding=batch.sharding)
    step = built.train_step
    if not hasattr(step, "lower"):  # serialize_if_multiprocess_cpu's wrapper: the jitted step
        step = step.__wrapped__
    return all_reduce_operands(step.lower(built.state, batch, labels).compile().as_text())


if __name__ == "__main__":
    app.run(main)
