"""The probe library (experiments/probes.py): gradient statistics on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import files, losses, models
from nodepert_dist import step as step_lib
from nodepert_dist.estimator import NPSettings
from nodepert_dist.experiments import probes


def tiny(seed=0, batch=32, hl=16):
    model = models.build_model("fc", 10, n_hl=2, hl_size=hl)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    return model, params, x, y


def true_grad(model, params, x, y):
    return jax.grad(lambda p: jnp.mean(losses.mse(model.apply({"params": p}, x), y)))(params)


def test_sgd_against_itself_gives_angle_0_and_sign_symmetry_1():
    model, params, x, y = tiny()
    g = true_grad(model, params, x, y)
    s = probes.compare(g, g)
    for name in ("layer0", "layer1", "layer2", "all"):
        assert float(s[f"{name}_angle"]) < 0.1  # arccos near 1 loses digits: ~0.03 deg in float32
        assert float(s[f"{name}_sign_sym"]) == 1.0
        assert float(s[f"{name}_ratio"]) == pytest.approx(1.0, abs=1e-6)
    # and a sign flip is the opposite answer: the statistics can fail
    flipped = probes.compare(g, jax.tree.map(jnp.negative, g))
    assert (
        float(flipped["all_angle"]) > 179.9 and float(flipped["all_sign_sym"]) < 0.01
    )  # exact zeros (dead units) agree


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_np_mean_over_many_draws_approaches_angle_0():
    model, params, x, y = tiny()
    stats = {}
    for draws in (8, 512):
        gradient = step_lib.local_gradient(
            update_rule="np", loss="mse", seed=0, global_batch=len(y), np=NPSettings(sigma=1e-3)
        )
        fn = probes.probe_fn(model, gradient, loss="mse", draws=draws, norms=True)
        stats[draws] = jax.device_get(fn(params, x, y))
    few, many = stats[8], stats[512]
    # One draw is far from the gradient (the NP variance), the mean of 512 is close: the MC
    # error falls as 1/sqrt(draws). Measured: var/|g|^2 ~10; one draw 74 deg, the mean of 8
    # draws 46 deg, of 512 draws 8 deg.
    assert few["all_angle"] > 45
    assert many["all_angle_mean"] < 15 < few["all_angle_mean"]
    for name in ("layer0", "layer1", "layer2"):
        assert many[f"{name}_angle_mean"] < 25
    # the variance over draws is an estimate of the same quantity at any number of draws
    assert many["all_rel_var"] == pytest.approx(few["all_rel_var"], rel=0.6)
    assert few["all_norm_sgd"] == pytest.approx(
        float(probes.flat(true_grad(model, params, x, y)).__pow__(2).sum() ** 0.5), rel=1e-5
    )
    assert few["layer0_w_norm"] > 0 and few["layer1_act_norm"] > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(np_layerwise=True, np_draws=2, np_antithetic=True),
        dict(np_estimator="original", noise="gaussian"),
    ],
)
@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_probe_estimate_is_the_train_steps_gradient(options):
    """probes.np_estimate of a run's local gradient at step s is the update the train step
    makes at step s (sgd at lr 1: params - new params), estimator options included."""
    from nodepert_dist import mesh as mesh_lib
    from nodepert_dist import optim

    model, params, x, y = tiny(batch=32)
    params = jax.device_get(params)  # host copies: the train step donates its state
    settings = NPSettings(sigma=1e-2, **options)
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    opt = optim.make_optimizer("sgd", 1.0, 0.0)
    rule = dict(update_rule="np", loss="mse", seed=2, np=settings)
    train_step = step_lib.make_train_step(model, opt, mesh, global_batch=len(y), **rule)
    state = jax.device_put(
        step_lib.TrainState(step=jnp.int32(7), params=params, opt_state=opt.init(params)),
        mesh_lib.replicated(mesh),
    )
    new, _ = train_step(state, *mesh_lib.global_batch(mesh, np.asarray(x), np.asarray(y)))
    update = jax.tree.map(lambda a, b: a - b, params, jax.device_get(new.params))
    gradient = step_lib.local_gradient(global_batch=len(y), **rule)
    probe = jax.jit(lambda p, s: probes.np_estimate(gradient, model, p, x, y, s))
    probed = probe(params, jnp.int32(7))
    np.testing.assert_allclose(probes.flat(probed), probes.flat(update), rtol=1e-4, atol=1e-7)
    # and another step's noise is another estimate: the comparison can fail
    other = probe(params, jnp.int32(8))
    assert not np.allclose(probes.flat(other), probes.flat(update), rtol=1e-2)


@pytest.mark.slow  # trains (one step, in process)
def test_grad_stats_measures_the_estimator_the_run_trains_with(tmp_path, mnist_dir):
    """The grad-stats Hook in a run with --np_layerwise --np_draws=4 (gaussian, sigma 0.05):
    its step-0 statistics are of that estimator (the norm of one estimate at the probe's noise
    step, computed here from the estimator itself), not of the plain one."""
    from nodepert_dist import config, perturbation, train
    from nodepert_dist.data import preprocess, store

    seed, size, sigma = 3, 64, 0.05
    cfg = config.Config(
        dataset="mnist",
        data_dir=mnist_dir,
        network="fc",
        n_hl=1,
        hl_size=16,
        batchsize=64,
        validation_size=59000,
        eval_train=False,
        eval_batchsize=4000,
        num_epochs=1,
        max_steps=1,
        checkpoint_every_epochs=0,
        workdir=str(tmp_path / "run"),
        seed=seed,
        sigma=sigma,
        noise="gaussian",
        np_layerwise=True,
        np_draws=4,
    )
    path = str(tmp_path / "grad_stats.jsonl")
    train.run(cfg, hooks=[probes.Hook(path, every=1, draws=1, probe_size=size, at_start=True)])
    row = files.read_jsonl(path)[0]
    assert row["step"] == 0
    data = store.open_dataset("mnist", mnist_dir)
    x, y = probes.probe_batch(
        data, {"train": (0, 1000)}, preprocess.resolve("auto", "mnist"), size, seed
    )
    model = models.build_model("fc", 10, n_hl=1, hl_size=16)
    params = model.init(perturbation.stream_key(seed, "init"), x[:1])["params"]
    keys = perturbation.example_keys(seed, jnp.int32(probes._STATS_STEP), jnp.arange(size))

    def norm(**options):
        g = jax.jit(  # jitted: eager dispatch of the estimator cost seconds
            lambda p: perturbation.np_gradient(
                model,
                p,
                x,
                y,
                losses.mse,
                sigma=sigma,
                keys=keys,
                normalizer=size,
                noise_kind="gaussian",
                **options,
            )[0]
        )(params)
        return float(jnp.linalg.norm(probes.flat(g)))

    run_estimator, plain = norm(layerwise=True, draws=4), norm()
    assert abs(plain - run_estimator) > 0.1 * run_estimator  # the two are told apart
    assert row["all_norm_np"] == pytest.approx(run_estimator, rel=1e-4)
