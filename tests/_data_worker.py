"""Test harness: one process of a jax.distributed job reading its share of a converted dataset.

Run by launch/local.py (NODEPERT_* env). For every step of one epoch it records the dataset rows
this process gathered, and the global batch assembled with make_array_from_process_local_data
(all-gathered back to the host), into <out>/rank<i>.npz.
"""

import sys

import numpy as np


def main(data_dir, out, augment):
    from nodepert_dist import distributed

    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils

    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist.data import pipeline, store

    data = store.open_dataset("cifar10", data_dir)
    mesh = mesh_lib.make_mesh()
    batches = pipeline.train_batches(
        data.train_x,
        data.train_y,
        global_batch=40,
        seed=5,
        epoch=2,
        rows=(0, 180),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=augment,
    )
    local_rows, global_x, global_y = [], [], []
    for x, y in pipeline.iterate(batches):
        local_rows.append(y)  # the fake labels are the row numbers
        gx, gy = mesh_lib.global_batch(mesh, x, y)
        global_x.append(multihost_utils.process_allgather(gx, tiled=True))
        global_y.append(multihost_utils.process_allgather(gy, tiled=True))
    np.savez(
        f"{out}/rank{jax.process_index()}.npz",
        rows=np.stack(local_rows),
        x=np.stack(global_x),
        y=np.stack(global_y),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
