"""The epoch time a user sees in metrics.jsonl, NP vs SGD, with the project's defaults.

    python benchmarks/epoch_time.py --batchsizes=128,1024 --repeats=2

Trains fc on real MNIST (`--data_dir`) for two epochs per run, NP and SGD alternating, and
reports the median `epoch_time` of epoch 2 (epoch 1's includes compiling the step) and the ratio. Evaluation of the training set and
checkpoints are off (neither is inside `epoch_time`, they only make the runs longer).
"""

from __future__ import annotations

import os
import statistics
import tempfile

from absl import app, flags

from nodepert_dist import cli, files

# nodepert_dist.train defines --network, --data_dir, --cpu_devices (and the rest of its CLI).
from nodepert_dist import train as train_lib
from nodepert_dist.data import DataError

flags.DEFINE_list("batchsizes", ["128", "1024"], "Global batch sizes.")
flags.DEFINE_integer("repeats", 2, "Runs of each rule; the median epoch time is reported.")
flags.DEFINE_string("out", "benchmarks/results/epoch_time.jsonl", "JSON lines (appended).")
FLAGS = flags.FLAGS
cli.check_list("batchsizes", pattern=cli.POSITIVE_INT, what="a positive integer")


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        measure()
    except (ValueError, DataError) as e:  # a missing dataset, a batch the devices do not divide
        raise SystemExit(f"error: {e}") from None


def measure():
    from nodepert_dist import mesh as mesh_lib

    if FLAGS.xla_cpu_conv_flag:  # as nodepert-train does
        mesh_lib.tune_cpu_convolutions()
    if FLAGS.cpu_devices:
        mesh_lib.simulate_cpu_devices(FLAGS.cpu_devices)
    import jax
    from absl import logging

    Config, train = train_lib.Config, train_lib.train
    logging.set_verbosity(logging.WARNING)
    for b in map(int, FLAGS.batchsizes):
        times = {"np": [], "sgd": []}
        for _ in range(FLAGS.repeats):
            for rule in times:
                with tempfile.TemporaryDirectory() as workdir:
                    rows = train(
                        Config(
                            network=FLAGS.network,
                            update_rule=rule,
                            batchsize=b,
                            num_epochs=2,
                            data_dir=FLAGS.data_dir,
                            workdir=workdir,
                            eval_train=False,
                            checkpoint_every_epochs=0,
                        )
                    )
                times[rule].append(rows[-1]["epoch_time"])
        np_s, sgd_s = statistics.median(times["np"]), statistics.median(times["sgd"])
        row = {
            "network": FLAGS.network,
            "batchsize": b,
            "devices": jax.device_count(),
            "np_epoch_s": np_s,
            "sgd_epoch_s": sgd_s,
            "np_vs_sgd": np_s / sgd_s,
            "device_kind": jax.devices()[0].device_kind,
        }
        print(
            f"{FLAGS.network} B={b} on {row['devices']} device(s): NP {np_s:.2f} s, "
            f"SGD {sgd_s:.2f} s per epoch, NP / SGD = {np_s / sgd_s:.2f}",
            flush=True,
        )
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)  # once a row exists
        files.append_jsonl(FLAGS.out, [row])


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("benchmarks/epoch_time.py"))
