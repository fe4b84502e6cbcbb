"""The data-parallel step: same update on 1 and 8 devices, and the right gradient scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, optim, perturbation, precision
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings

GLOBAL_BATCH = 64


def _batches(n_steps, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    return [
        (
            rng.normal(size=(GLOBAL_BATCH,) + shape).astype(np.float32),
            rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32),
        )
        for _ in range(n_steps)
    ]


def _run(
    n_devices,
    network,
    update_rule,
    optimizer="sgd",
    n_steps=3,
    lr=0.05,
    dtype=np.float32,
    **options,
):
    mesh = mesh_lib.make_mesh(jax.devices()[:n_devices])
    model = models.build_model(
        network, 10, n_hl=2, hl_size=32, width=2, local_heads=options.get("np_local", False)
    ).clone(dtype=dtype)
    opt = optim.make_optimizer(optimizer, lr, 1e-4)
    batches = [(x.astype(dtype), y) for x, y in _batches(max(n_steps, 1))]
    state = step_lib.init_state(model, opt, batches[0][0], 0, mesh)
    state = jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    params0 = jax.device_get(state.params)
    options.setdefault("sigma", precision.default_sigma(network))
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule=update_rule,
        loss="mse",
        seed=3,
        global_batch=GLOBAL_BATCH,
        np=NPSettings(**options),
    )
    m = None
    for x, y in batches[:n_steps]:
        state, m = step(state, *mesh_lib.global_batch(mesh, x, y))
    return params0, jax.device_get(state.params), jax.device_get(m)


def _relative_change_difference(network, update_rule, dtype, n_steps=3, **options):
    """max over leaves of |(p1 - p0) - (p8 - p0)| / |p1 - p0|: 1-device vs 8-device runs."""
    # Both runs start from the same parameters (init from seed 0): the 1-device run's.
    p0, p1, m1 = _run(1, network, update_rule, n_steps=n_steps, dtype=dtype, **options)
    _, p8, m8 = _run(8, network, update_rule, n_steps=n_steps, dtype=dtype, **options)
    worst = 0.0
    for a, b, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(p0)):
        change = np.linalg.norm(a - c)
        assert change > 0, "the steps did not move the parameters"
        worst = max(worst, float(np.linalg.norm(a - b) / change))
    assert m1["correct"] == m8["correct"]
    np.testing.assert_allclose(m1["loss_sum"], m8["loss_sum"], rtol=1e-4)
    return worst


@pytest.mark.parametrize(
    "network, update_rule",
    [("fc", "np"), ("fc", "sgd"), ("conv", "np"), ("conv", "sgd"), ("vgg", "np"), ("resnet", "np")],
)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_same_update_on_1_and_8_devices_float64(network, update_rule):
    """In float64 the meshes agree to ~1e-12: the algorithm itself is mesh-invariant.
    SGD runs on fc and conv only: its cross-device path (jax.grad of the local loss sum over the
    global batch, one psum) does not depend on the model, and what does (that vgg's and resnet's
    forward treat each example alone, so a device's share gives the same logits) is checked by
    their NP cases, whose clean forward gives the compared loss sum and correct count."""
    with jax.enable_x64(True):
        assert _relative_change_difference(network, update_rule, np.float64) < 1e-9


NP_OPTIONS = {
    "gaussian-regen": dict(noise="gaussian", np_mode="regen"),
    "microbatches": dict(np_microbatches=2),
    "antithetic": dict(np_antithetic=True, sigma=1e-2),
    "2-draws": dict(np_draws=2),
    "jvp": dict(np_delta="jvp"),
    "layerwise": dict(np_layerwise=True),
    "layerwise-jvp-2-draws-microbatches": dict(
        np_layerwise=True, np_delta="jvp", np_draws=2, np_microbatches=2
    ),
    "original-estimator": dict(np_estimator="original"),
    "local": dict(np_local=True),
    "local-antithetic-2-draws-microbatches": dict(
        np_local=True, np_antithetic=True, sigma=1e-2, np_draws=2, np_microbatches=2
    ),
}


@pytest.mark.parametrize("option", list(NP_OPTIONS))
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_options_same_update_on_1_and_8_devices_float64(option):
    """Microbatches split each device's 8 examples in two: 1 device runs 2 x 32, 8 run 2 x 4.
    The variance-reduction options (perturbation.py) run on fc, the rest (and --np_local's
    first case) on conv."""
    network = "conv" if option in ("gaussian-regen", "microbatches", "local") else "fc"
    with jax.enable_x64(True):
        assert _relative_change_difference(network, "np", np.float64, **NP_OPTIONS[option]) < 1e-9


@pytest.mark.parametrize("update_rule", ["np", "sgd"])
@pytest.mark.parametrize("network", ["fc", "conv"])
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_same_update_on_1_and_8_devices_float32(network, update_rule):
    """One float32 update from the same parameters. SGD agrees to summation order. NP divides
    per-example loss differences by sigma, so the last-bit differences XLA's CPU matmuls make
    between batch shapes (measured ~5e-7 on the fc logits) grow to ~3e-3 of the fc update (the
    conv kernels are batch-shape independent here: ~1e-6). 1e-2 bounds that float32 floor; a
    wrong key, scale or shard gives O(1). Over several float32 steps the floor compounds
    (sigma=1e-5: ~2e-2 after 3 steps), which is why the multi-step claim is tested in float64.
    """
    tolerance = 1e-2 if update_rule == "np" else 1e-5
    assert _relative_change_difference(network, update_rule, np.float32, n_steps=1) < tolerance


def _one_update(update_rule, n_devices, optimizer="sgd", at_step=0):
    """Parameters after one step with lr=1 from the same init: params0 - grad."""
    mesh = mesh_lib.make_mesh(jax.devices()[:n_devices])
    model = models.build_model("fc", 10, n_hl=1, hl_size=16)
    opt = optim.make_optimizer(optimizer, 1.0, 0.0)
    ((x, y),) = _batches(1, shape=(12,))
    state = step_lib.init_state(model, opt, x, 0, mesh)
    state = state.replace(step=jax.device_put(jnp.int32(at_step), state.step.sharding))
    params0 = jax.device_get(state.params)
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule=update_rule,
        loss="ce",
        seed=5,
        global_batch=GLOBAL_BATCH,
        np=NPSettings(sigma=1e-3),
    )
    state, _ = step(state, *mesh_lib.global_batch(mesh, x, y))
    return model, params0, jax.device_get(state.params), x, y


def test_sgd_update_is_the_global_batch_gradient():
    """Guards the N-times trap: sharded grads must equal jax.grad of the global mean loss."""
    model, p0, p1, x, y = _one_update("sgd", 8)
    grad = jax.grad(lambda p: jnp.mean(losses.ce(model.apply({"params": p}, x), y)))(p0)
    for a, b, g in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(grad)):
        np.testing.assert_allclose(a - b, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("at_step", [0, 7])
def test_np_update_is_the_global_batch_estimate(at_step):
    """The sharded NP step equals the estimator on the whole batch with the same noise keys,
    which are those of the state's step: a step that reused step 0's noise fails at step 7."""
    model, p0, p1, x, y = _one_update("np", 8, at_step=at_step)
    estimate = lambda step: perturbation.np_gradient(
        model,
        p0,
        x,
        y,
        losses.ce,
        sigma=1e-3,
        normalizer=GLOBAL_BATCH,
        keys=perturbation.example_keys(5, step, jnp.arange(GLOBAL_BATCH)),
    )[0]
    grad, other = estimate(at_step), estimate(at_step + 1)
    for a, b, g, o in zip(
        jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(grad), jax.tree.leaves(other)
    ):
        np.testing.assert_allclose(a - b, g, rtol=1e-3, atol=1e-6)
        assert not np.allclose(a - b, o, rtol=1e-2, atol=1e-6)


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_peak_memory_is_below_sgd():
    """XLA's memory analysis (deterministic, compile only) of the conv net's step at batch 128.
    Measured: NP 31.9 MB, SGD 43.6 MB; without the layer-by-layer ordering of the weight-
    gradient ops NP held 56.5 MB."""
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    model = models.build_model("conv", 10)
    opt = optim.make_optimizer("sgd", 0.1, 0.0)
    x, y = np.zeros((128, 28, 28, 1), np.float32), np.zeros(128, np.int32)
    state = step_lib.init_state(model, opt, x, 0, mesh)
    temp = {}
    for rule in ("np", "sgd"):
        step = step_lib.make_train_step(
            model,
            opt,
            mesh,
            update_rule=rule,
            loss="mse",
            seed=0,
            global_batch=128,
            np=NPSettings(sigma=1e-5),
        )
        compiled = step.lower(state, *mesh_lib.global_batch(mesh, x, y)).compile()
        temp[rule] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["np"] < 0.85 * temp["sgd"], temp


def test_decoupled_weight_decay_matches_the_original_rule():
    """w <- w - lr*dw - wd*w (decay not scaled by lr)."""
    opt = optim.make_optimizer("sgd", 0.1, 0.01)
    w, g = jnp.array([2.0, -4.0]), jnp.array([1.0, 1.0])
    updates, _ = opt.update(g, opt.init(w), w)
    np.testing.assert_allclose(w + updates, w - 0.1 * g - 0.01 * w, rtol=1e-6)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    mesh = mesh_lib.make_mesh()
    with pytest.raises(ValueError, match="not divisible by the 8 devices.*multiple of 8"):
        mesh_lib.check_batch(100, mesh)


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_default_eval_batch_works_on_any_device_count(tmp_path, mnist_dir, monkeypatch):
    """main refused the default --eval_batchsize=1024 on 3, 6 or 12 devices; evaluation pads
    its last batch, so it is rounded up to the devices (1026 on 3), with the same result as
    on 8 devices (the untrained network's epoch-0 row, same seed). Both runs in this process:
    the run's mesh (train.run's make_mesh(), all devices) made over the first 3 of the 8 (a
    subprocess with --cpu_devices=3 took ~10 s more to start and compile)."""
    from nodepert_dist import train
    from nodepert_dist.config import Config

    real_mesh, real_round_up = mesh_lib.make_mesh, mesh_lib.round_up_batch

    def run(n_devices):
        made = []  # the run's mesh sizes and rounded eval batches

        def make_mesh(devices=None, **kw):
            mesh = real_mesh(jax.devices()[:n_devices] if devices is None else devices, **kw)
            made.append(("mesh", mesh.devices.size))
            return mesh

        def round_up_batch(batch, mesh):
            made.append(("eval batch", real_round_up(batch, mesh)))
            return made[-1][1]

        with monkeypatch.context() as m:
            m.setattr(mesh_lib, "make_mesh", make_mesh)
            m.setattr(mesh_lib, "round_up_batch", round_up_batch)
            rows = train.train(
                Config(
                    hl_size=8,
                    n_hl=1,
                    batchsize=120,
                    max_steps=1,
                    eval_train=False,
                    checkpoint_every_epochs=0,
                    data_dir=mnist_dir,
                    workdir=str(tmp_path / f"run{n_devices}"),
                )
            )
        return rows[0], made

    (three, made3), (eight, made8) = run(3), run(8)
    assert made3 == [("mesh", 3), ("eval batch", 1026)], made3
    assert made8 == [("mesh", 8), ("eval batch", 1024)], made8
    assert three["test_acc"] == eight["test_acc"]
    assert three["test_loss"] == pytest.approx(eight["test_loss"], rel=1e-6)


def test_eval_batch_rounds_up_to_the_devices():
    mesh = mesh_lib.make_mesh(jax.devices()[:3])
    assert [mesh_lib.round_up_batch(b, mesh) for b in (1, 3, 1024, 1026)] == [3, 3, 1026, 1026]


def test_batch_error_suggests_the_nearest_multiples():
    mesh = mesh_lib.make_mesh(jax.devices()[:3])
    with pytest.raises(ValueError, match=r"multiple of 3 \(e.g. 126 or 129\)$"):
        mesh_lib.check_batch(128, mesh)
    with pytest.raises(ValueError, match=r"multiple of 3 \(e.g. 3\)$"):
        mesh_lib.check_batch(2, mesh)
