"""Test harness: `nodepert-train` in every process, printing the metric rows of *every* process.

train.main prints only from process 0; the tests need each process's view to check that all
processes agree on every metric. Same flags as nodepert-train (plus the distributed ones).
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

    rows = train.train(config.from_flags())
    print(f"ROWS {jax.process_index()} {json.dumps(rows)}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
