"""The Grain pipeline: process shards, resume, augmentation, evaluation; preprocessing statistics."""

import numpy as np
import pytest

from nodepert_dist.data import augment, pipeline, preprocess

# ----------------------------------------------------------------------------- shards and order


def _images(n, side=6):
    """uint8 images whose first pixel encodes the row number (n <= 65536), random elsewhere."""
    x = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


def _epoch(n, global_batch, epoch, p, count, seed=7, start=0, **kw):
    x = np.arange(n)  # the "images" are their own row numbers
    batches = pipeline.train_batches(
        x,
        x,
        global_batch=global_batch,
        seed=seed,
        epoch=epoch,
        process_index=p,
        process_count=count,
        **kw,
    )
    return [xb for xb, _ in pipeline.iterate(batches, start=start)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_the_epoch(count):
    n, batch = 1000, 96
    shards = [np.concatenate(_epoch(n, batch, 1, p, count)) for p in range(count)]
    seen = np.concatenate(shards)
    steps = n // batch
    assert len(seen) == steps * batch == len(np.unique(seen))  # disjoint, nothing repeated
    assert all(len(s) == steps * batch // count for s in shards)
    assert set(seen) <= set(range(n)) and n - len(seen) < batch  # only the remainder is dropped


def test_global_batch_is_the_same_for_any_process_count():
    one = _epoch(1000, 96, 3, 0, 1)
    for count in (2, 4):
        per_process = [_epoch(1000, 96, 3, p, count) for p in range(count)]
        for step, batch in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([b[step] for b in per_process]), batch)


def test_each_epoch_has_its_own_order_and_it_is_reproducible():
    a, b = np.concatenate(_epoch(500, 50, 1, 0, 1)), np.concatenate(_epoch(500, 50, 2, 0, 1))
    assert not np.array_equal(a, b) and sorted(a) == sorted(b)
    np.testing.assert_array_equal(a, np.concatenate(_epoch(500, 50, 1, 0, 1)))
    assert not np.array_equal(a, np.concatenate(_epoch(500, 50, 1, 0, 1, seed=8)))


def test_a_row_range_keeps_the_other_rows_out():
    seen = np.concatenate(_epoch(500, 50, 1, 0, 1, rows=(0, 450)))
    assert len(seen) == 450 and seen.max() < 450  # the held-out rows 450.. never appear


@pytest.mark.parametrize("aug", [False, True])
def test_resuming_mid_epoch_gives_the_same_batches(aug):
    x = _images(300)
    y = np.arange(300)
    batches = pipeline.train_batches(x, y, global_batch=30, seed=1, epoch=2, augment=aug)
    full = list(pipeline.iterate(batches))
    # A fresh pipeline, as after a restart, started at step 4.
    again = pipeline.train_batches(x, y, global_batch=30, seed=1, epoch=2, augment=aug)
    tail = list(pipeline.iterate(again, start=4))
    assert len(full) == 10 and len(tail) == 6
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    plain = list(pipeline.iterate(pipeline.train_batches(x, y, global_batch=30, seed=1, epoch=2)))
    assert np.array_equal(full[0][0], plain[0][0]) != aug  # the flag really changes the images


def test_augmentation_is_the_same_across_restarts_and_process_counts():
    x, y = _images(400), np.arange(400)
    one = list(
        pipeline.iterate(
            pipeline.train_batches(x, y, global_batch=40, seed=3, epoch=5, augment=True)
        )
    )
    two = [
        list(
            pipeline.iterate(
                pipeline.train_batches(
                    x,
                    y,
                    global_batch=40,
                    seed=3,
                    epoch=5,
                    augment=True,
                    process_index=p,
                    process_count=2,
                )
            )
        )
        for p in range(2)
    ]
    for step, (xb, yb) in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([two[0][step][0], two[1][step][0]]), xb)
        # Each augmented image is the crop/flip of its own row, drawn from (seed, epoch, row).
        expect = augment.crop_flip(x[yb], augment.example_bits(3, 5, yb))
        np.testing.assert_array_equal(xb, expect)
    other_epoch = list(
        pipeline.iterate(
            pipeline.train_batches(x, y, global_batch=40, seed=3, epoch=6, augment=True)
        )
    )
    rows5, rows6 = np.concatenate([b[1] for b in one]), np.concatenate([b[1] for b in other_epoch])
    img5 = np.concatenate([b[0] for b in one])[np.argsort(rows5)]
    img6 = np.concatenate([b[0] for b in other_epoch])[np.argsort(rows6)]
    assert np.mean([not np.array_equal(a, b) for a, b in zip(img5, img6)]) > 0.8  # new draws


def test_crop_and_flip_are_what_they_say():
    x = _images(4, side=8)
    bits = lambda dy, dx, flip: np.full(4, dy + (dx << 16) + (flip << 32), np.uint64)
    np.testing.assert_array_equal(augment.crop_flip(x, bits(4, 4, 0)), x)  # centre, no flip
    np.testing.assert_array_equal(augment.crop_flip(x, bits(4, 4, 1)), x[:, :, ::-1])
    shifted = augment.crop_flip(x, bits(5, 2, 0))  # one row down, two columns left
    np.testing.assert_array_equal(shifted[:, :-1, 2:], x[:, 1:, :-2])
    assert (shifted[:, -1] == 0).all() and (shifted[:, :, :2] == 0).all()  # zero padding
    draws = augment.example_bits(0, 1, np.arange(20000))
    dy = (draws & np.uint64(0xFFFF)) % np.uint64(9)
    assert (
        set(np.unique(dy)) == set(range(9))
        and 0.45 < ((draws >> np.uint64(32)) & np.uint64(1)).mean() < 0.55
    )


def test_eval_batches_cover_every_example_once():
    x = np.arange(1003)
    for rows in (None, (900, 1003)):
        lo, hi = rows or (0, 1003)
        seen = []
        for count in (1, 2):
            got = []
            for p in range(count):
                ds = pipeline.eval_batches(
                    x, x, global_batch=200, process_index=p, process_count=count, rows=rows
                )
                for xb, _, mask in pipeline.iterate(ds):
                    got.extend(xb[mask > 0].tolist())
            seen.append(sorted(got))
        assert seen[0] == seen[1] == list(range(lo, hi))


def test_rows_pickle_as_the_file_name_not_the_data(tmp_path):
    import pickle

    path = tmp_path / "a.npy"
    np.save(path, np.arange(100000, dtype=np.int32))
    rows = pipeline.Rows(np.load(path, mmap_mode="r"))
    blob = pickle.dumps(rows)
    assert len(blob) < 1000
    np.testing.assert_array_equal(pickle.loads(blob)[[5, 7]], [5, 7])


# ----------------------------------------------------------------------------- preprocessing


def _rgb(n=600, side=4, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, side, side, 3)).astype(np.float64)
    base[..., 1] = base[..., 1] * 0.5 + 60  # channels with different statistics
    base[..., 2] = 0.7 * base[..., 0] + 0.3 * base[..., 2]  # and correlated pixels for ZCA
    return base.astype(np.uint8)


@pytest.mark.parametrize("mode", ["standardize", "per_channel", "unit"])
def test_statistics_match_numpy_on_the_training_rows(tmp_path, mode):
    x = _rgb()
    lo, hi = 0, 500  # rows 500.. are a held-out validation split: not in the statistics
    stats = preprocess.statistics(str(tmp_path), x, mode, lo, hi)
    train = x[lo:hi].astype(np.float64) / 255
    axes = (0, 1, 2, 3) if mode == "standardize" else (0, 1, 2)
    if mode != "unit":
        np.testing.assert_allclose(stats["mean"], train.mean(axis=axes), rtol=1e-12)
        np.testing.assert_allclose(stats["std"], train.std(axis=axes), rtol=1e-10)
    out = preprocess.apply(x[lo:hi], mode, {k: v.astype(np.float32) for k, v in stats.items()})
    assert out.dtype == np.float32
    if mode == "unit":
        np.testing.assert_allclose(out, train, atol=1e-7)
    else:
        np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-5)
        np.testing.assert_allclose(out.std(axis=axes), 1, atol=1e-5)
    # Cached: a second call reads the file (even if the images changed under it).
    assert len(list((tmp_path / "stats").glob(f"{mode}-rows0-500*.npz"))) == 1
    again = preprocess.statistics(str(tmp_path), np.zeros_like(x), mode, lo, hi)
    for k in stats:
        np.testing.assert_array_equal(again[k], stats[k])


def test_zca_whitens_the_training_split(tmp_path):
    x = _rgb(n=2000)
    stats = preprocess.statistics(str(tmp_path), x, "zca", 0, 1800)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)
    raw_cov = np.cov(flat(x[:1800]) / 255, rowvar=False, bias=True)
    assert np.abs(raw_cov - np.diag(np.diag(raw_cov))).max() > 0.01  # correlated before
    out = flat(preprocess.apply(x[:1800], "zca", stats))
    cov = np.cov(out, rowvar=False, bias=True)
    # Whitened covariance = U diag(lambda / (lambda + eps)) U^T: each entry is within
    # eps / min(lambda) of I (1.3e-3 for these data; a bug would be off by O(1)).
    tol = preprocess.ZCA_EPSILON / np.linalg.eigvalsh(raw_cov).min()
    assert tol < 5e-3
    np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=tol + 1e-6)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)


def test_device_preprocessing_matches_the_host_and_keeps_the_sharding():
    import jax

    from nodepert_dist import mesh as mesh_lib

    mesh = mesh_lib.make_mesh()
    x = _rgb(n=16)
    stats = preprocess.compute(x, "zca", 0, 16)
    out = preprocess.device_fn("zca", stats, mesh)(mesh_lib.global_batch(mesh, x)[0])
    assert out.dtype == np.float32 and out.sharding == mesh_lib.batch_sharding(mesh)
    host = preprocess.apply(x, "zca", {k: v.astype(np.float32) for k, v in stats.items()})
    np.testing.assert_allclose(np.asarray(jax.device_get(out)), host, atol=2e-3)


def test_preprocess_auto_is_per_channel_for_cifar_only():
    assert preprocess.resolve("auto", "cifar10") == "per_channel"
    assert preprocess.resolve("auto", "mnist") == "standardize"
    with pytest.raises(ValueError, match="--preprocess='pca' is not one of"):
        preprocess.resolve("pca", "mnist")
