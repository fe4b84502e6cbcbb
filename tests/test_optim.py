"""Training aids (optim.py through optim.make_optimizer): schedules, clipping, weight norms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nodepert_dist import optim


def _lrs(kind, steps=10, **kw):
    rate = optim.lr_schedule(kind, 0.5, total_steps=steps, **kw)
    return [float(rate(i)) if callable(rate) else rate for i in range(steps + 1)]


def test_schedules():
    assert _lrs("constant") == [0.5] * 11
    cos = _lrs("cosine")
    assert cos[0] == 0.5 and cos[10] == pytest.approx(0.0, abs=1e-7)
    assert cos[5] == pytest.approx(0.25) and all(a >= b for a, b in zip(cos, cos[1:]))
    warm = _lrs("cosine", warmup_steps=4)
    assert warm[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert warm[10] == pytest.approx(0.0, abs=1e-7)
    assert _lrs("step", decay_every=4, decay_factor=0.1) == pytest.approx(
        [0.5] * 4 + [0.05] * 4 + [0.005] * 3
    )
    with pytest.raises(ValueError, match="needs --lr_decay_epochs > 0"):
        optim.lr_schedule("step", 0.5, total_steps=10)
    with pytest.raises(ValueError, match="unknown --lr_schedule='linear'"):
        optim.lr_schedule("linear", 0.5, total_steps=10)


def test_default_optimizer_is_the_plain_one():
    """No aid asked for: the same optax transformation as before they existed (same state)."""
    params = {"w": jnp.ones((3, 2))}
    state = optim.make_optimizer("adam", 1e-3, 0.0).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(optax.adam(1e-3).init(params))


def _apply(opt, params, grads, steps=1):
    @jax.jit  # one compiled update: op by op, a ResNet's tree took ~45 s here
    def step(params, state):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(opt.init)(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_clip_norm_clips_the_global_norm_before_the_optimizer():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
    grads = {"a": jnp.full(3, 3.0), "b": jnp.full(4, 4.0)}  # global norm sqrt(27 + 64)
    new = _apply(optim.make_optimizer("sgd", 1.0, 0.0, clip_norm=1.0), params, grads)
    norm = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(new))))
    assert norm == pytest.approx(1.0, rel=1e-6)
    small = _apply(optim.make_optimizer("sgd", 1.0, 0.0, clip_norm=100.0), params, grads)
    np.testing.assert_allclose(small["a"], -3.0)


def test_weight_norm_holds_kernel_norms_and_leaves_biases():
    params = {"kernel": jax.random.normal(jax.random.key(0), (5, 4)), "bias": jnp.zeros(4)}
    grads = {"kernel": jax.random.normal(jax.random.key(1), (5, 4)), "bias": jnp.ones(4)}
    opt = optim.make_optimizer("sgd", 0.3, 0.0, weight_norm=True)
    new = _apply(opt, params, grads, steps=5)
    assert float(jnp.linalg.norm(new["kernel"])) == pytest.approx(
        float(jnp.linalg.norm(params["kernel"])), rel=1e-5
    )
    np.testing.assert_allclose(new["bias"], -1.5, rtol=1e-6)
    plain = _apply(optim.make_optimizer("sgd", 0.3, 0.0), params, grads, steps=5)
    assert float(jnp.linalg.norm(plain["kernel"])) != pytest.approx(
        float(jnp.linalg.norm(params["kernel"])), rel=1e-2
    )


@pytest.mark.slow  # seconds of compiling, sampling or subprocesses: not the inner loop
def test_weight_norm_leaves_zero_norm_kernels_trainable_and_finite():
    """ResNet's last conv of each residual branch starts at zero: main held it at norm 0 (never
    trained) and turned a zero kernel with a zero update into NaN."""
    from nodepert_dist import models

    model = models.build_model("resnet", 10, 0, 0, width=4)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    zero = [
        k for k, v in jax.tree_util.tree_leaves_with_path(params) if v.ndim >= 2 and not np.any(v)
    ]
    assert zero  # the case at hand: ResNet has zero-initialised kernels
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.1, p.dtype), params)
    opt = optim.make_optimizer("sgd", 0.5, 0.0, weight_norm=True)
    new = _apply(opt, params, grads, steps=2)
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        after = _at(new, path)
        assert np.all(np.isfinite(after)), path
        if before.ndim >= 2 and np.any(before):  # the others keep their initial norm
            assert np.linalg.norm(after) == pytest.approx(np.linalg.norm(before), rel=1e-5)
    assert all(np.any(_at(new, path)) for path in zero)  # trained
    # A zero kernel with a zero update stays exactly zero (no 0/0).
    still = _apply(opt, {"k": jnp.zeros((3, 3))}, {"k": jnp.zeros((3, 3))})
    np.testing.assert_array_equal(still["k"], 0.0)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_lr_schedule_reads_the_step_not_a_counter_of_its_own():
    """The lr at step s is the schedule's at s, whatever the optimizer state holds (a resumed
    run changing its schedule has no counter to carry)."""
    opt = optim.make_optimizer("sgd", 1.0, 0.0, schedule="cosine", total_steps=10)
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    state = opt.init(params)
    assert jax.tree.leaves(state) == []  # no counter
    updates, _ = opt.update(grads, state, params, step=5)
    np.testing.assert_allclose(updates["w"], -optim.lr_schedule("cosine", 1.0, total_steps=10)(5))
    with pytest.raises(ValueError, match="needs the step"):
        opt.update(grads, state, params)
