"""Learning on real MNIST, 8 simulated devices, within a CI budget (~1 minute together)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nodepert_dist import losses, models, optim, precision, train
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.data import store
from nodepert_dist.estimator import NPSettings

pytestmark = pytest.mark.slow  # subprocesses, several processes or training: `-m "not slow"` skips


def _final_test_acc(mnist_dir, tmp_path, **overrides):
    cfg = train.Config(
        dataset="mnist",
        data_dir=mnist_dir,
        workdir=str(tmp_path),
        batchsize=128,
        eval_train=False,
        seed=0,
        **overrides,
    )
    rows = train.train(cfg)
    return rows[-1]["test_acc"], rows


def test_sgd_reaches_97_percent(mnist_dir, tmp_path):
    acc, rows = _final_test_acc(
        mnist_dir, tmp_path, network="fc", update_rule="sgd", loss="ce", lr=0.3, num_epochs=2
    )
    assert acc >= 0.97, rows


def test_np_reaches_85_percent(mnist_dir, tmp_path):
    # A narrower net than the default 2 x 500: NP's variance grows with the number of perturbed
    # nodes, so a small net learns within this budget (2 x 500: docs/results/np_vs_sgd_mnist.md).
    acc, rows = _final_test_acc(
        mnist_dir,
        tmp_path,
        network="fc",
        update_rule="np",
        loss="mse",
        n_hl=1,
        hl_size=128,
        lr=0.05,
        num_epochs=4,
    )
    assert acc >= 0.85, rows


def _train_steps(mnist_dir, network, update_rule, *, lr, steps, batch=64):
    """`steps` Adam steps over the first MNIST training images in order, on 8 devices, width 4
    (channels 4-32). Returns (model, params, data, prep)."""
    data = store.open_dataset("mnist", mnist_dir)
    prep = lambda a: (np.asarray(a, np.float32) / 255.0 - 0.13) / 0.31
    mesh = mesh_lib.make_mesh()
    model = models.build_model(network, 10, width=4)
    opt = optim.make_optimizer("adam", lr, 0.0)
    state = step_lib.init_state(model, opt, prep(data.train_x[:1]), 0, mesh)
    step = step_lib.make_train_step(
        model,
        opt,
        mesh,
        update_rule=update_rule,
        loss="ce",
        seed=0,
        global_batch=batch,
        np=NPSettings(sigma=precision.default_sigma(network)),
    )
    params0 = jax.device_get(state.params)  # the step donates its state
    for i in range(steps):
        part = slice(batch * i, batch * (i + 1))
        state, _ = step(
            state,
            *mesh_lib.global_batch(mesh, prep(data.train_x[part]), np.asarray(data.train_y[part])),
        )
        # One step at a time: a deep queue of collectives over simulated CPU devices can
        # exhaust XLA's host thread pool (the train loop keeps one step in flight likewise).
        jax.block_until_ready(state)
    return model, params0, state.params, data, prep


def test_small_resnet_with_sgd_reaches_95_percent(mnist_dir):
    """300 steps of 64 training images (19200, each once), Adam; the whole test set.
    Measured: 95.7% (187 steps at lr 5e-3 gave 90.8%: this is the budget where it gets there)."""
    model, _, params, data, prep = _train_steps(mnist_dir, "resnet", "sgd", lr=3e-3, steps=300)
    predict = jax.jit(lambda x: jnp.argmax(model.apply({"params": params}, x), -1))
    correct = sum(
        int(
            np.sum(
                np.asarray(predict(prep(data.test_x[i : i + 2000])))
                == np.asarray(data.test_y[i : i + 2000])
            )
        )
        for i in range(0, len(data.test_y), 2000)
    )
    assert correct / len(data.test_y) >= 0.95, correct


# resnet with SGD: test_small_resnet_with_sgd_reaches_95_percent.
@pytest.mark.parametrize("network, update_rule", [("vgg", "sgd"), ("vgg", "np"), ("resnet", "np")])
def test_zoo_models_learn(mnist_dir, network, update_rule):
    """40 Adam steps of 64 real MNIST images lower the loss on 512 held-out test images, with
    backprop and with NP."""
    model, params0, params, data, prep = _train_steps(
        mnist_dir, network, update_rule, lr=2e-3, steps=40
    )
    held_x, held_y = prep(data.test_x[:512]), np.asarray(data.test_y[:512])
    held_loss = jax.jit(lambda p: jnp.mean(losses.ce(model.apply({"params": p}, held_x), held_y)))
    before, after = float(held_loss(params0)), float(held_loss(params))
    assert after < (0.7 if update_rule == "sgd" else 0.97) * before, (before, after)
