"""The step's sums as flat buffers (allreduce.py): the same update to the bit, one collective per
dtype, and only where it pays (CPU devices in several processes; the 2-process run itself is
tests/test_multiprocess.py)."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nodepert_dist import allreduce, models, population, run_setup
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.config import Config

BATCH, STEPS_PER_EPOCH = 64, 10


def _mesh_of(platform, processes):
    """A stand-in mesh: 8 devices of `platform` spread over `processes` processes."""
    devices = [
        types.SimpleNamespace(platform=platform, process_index=i * processes // 8) for i in range(8)
    ]
    return types.SimpleNamespace(devices=np.array(devices, dtype=object))


def test_flat_sums_only_across_cpu_processes():
    assert allreduce.flat_sums(_mesh_of("cpu", 2))
    assert not allreduce.flat_sums(_mesh_of("cpu", 1))  # in-process: measured no gain
    assert not allreduce.flat_sums(_mesh_of("gpu", 2))  # NCCL groups a combined all-reduce
    assert not allreduce.flat_sums(mesh_lib.make_mesh(jax.devices()[:8]))


def test_psum_of_mixed_leaves_is_the_psum():
    """Leaves of several dtypes and shapes (scalars, an int vector, an empty node) in any order:
    one buffer per dtype, each leaf back in its place, values equal to jax.lax.psum's."""
    mesh = mesh_lib.make_mesh(jax.devices()[:8])
    rng = np.random.default_rng(1)
    tree = {
        "w": rng.normal(size=(8, 3, 2)).astype(np.float32),
        "n": rng.integers(-5, 5, size=(8, 4)).astype(np.int32),
        "s": {"a": rng.normal(size=(8,)).astype(np.float32), "none": None},
        "v": rng.normal(size=(8, 5)).astype(np.float32),
    }

    def sums(flat):
        def local(t):
            t = jax.tree.map(lambda a: a[0], t)  # this device's row
            return allreduce.psum(t, mesh_lib.DATA, flat=flat)

        spec = P(mesh_lib.DATA)
        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=P()))
        return fn, jax.device_get(fn(tree))

    fn, flat = sums(True)
    _, plain = sums(False)
    assert jax.tree.structure(flat) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(plain)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(flat["n"], tree["n"].sum(0))
    ops = [s for o in all_reduce_operands(fn.lower(tree).compile().as_text()) for s in o]
    assert sorted(ops) == ["f32[12]", "s32[4]"], ops


def all_reduce_operands(compiled_text: str) -> list[list[str]]:
    """The operand shapes (e.g. 'f32[648013]') of each all-reduce in compiled HLO text."""
    found = []
    for line in compiled_text.splitlines():
        match = re.search(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", line)
        if match:
            found.append(re.findall(r"[a-z]+\d*\[[\d,]*\]", match.group(1)))
    return found


# name: the run's settings. A solo NP and SGD run, --decorrelate (its statistics are summed
# with the gradient) and populations: members one after another (lax.map, CPU) or vmapped
# (accelerators), adam's state in the update.
CASES = {
    "np": dict(update_rule="np"),
    "sgd": dict(update_rule="sgd"),
    "np-decorrelate": dict(update_rule="np", decorrelate=True, decorrelate_lr=0.05),
    "np-population": dict(update_rule="np", population="lr:0.01,0.03;seed:3,4"),
    "sgd-adam-population-vmap": dict(
        update_rule="sgd", optimizer="adam", population="lr:0.01,0.03", vectorised=True
    ),
}


def _two_steps(cfg: Config, mesh):
    """(initial state, state after 2 float64 steps, last metrics, the step's compiled HLO)."""
    model = models.build(cfg.model, 10, decorrelate=cfg.decorrelate).clone(dtype=jnp.float64)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(BATCH, 8, 8, 1)), rng.integers(0, 10, BATCH)) for _ in range(2)]
    state = population.init_state(cfg, model, optimizer, batches[0][0], mesh)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    batches = [mesh_lib.global_batch(mesh, x, y.astype(np.int32)) for x, y in batches]
    start = jax.device_get(state)
    text = step.lower(state, *batches[0]).compile().as_text()
    for x, y in batches:
        state, m = step(state, x, y)
    return start, jax.device_get(state), jax.device_get(m), text


@pytest.mark.parametrize("case", list(CASES))
def test_flat_sums_give_the_same_step_float64(case, monkeypatch):
    """8 devices, 2 steps in float64, flat buffers vs XLA's tuple all-reduce: every parameter,
    optimizer moment, decorrelation matrix and metric agrees to float64 rounding (1e-12 of how
    far the steps moved it; a lost device, a wrong offset or swapped leaves is O(1)).

    Why rounding and not bits: the all-reduce itself is the same sum of the same 8 device
    values for every element, and concatenating and slicing copy exactly; but XLA compiles the
    local work that feeds a concatenation, not an all-reduce, with other layouts and fusions.
    Measured: np, sgd and np-population bitwise equal; the vmapped population's gradients and
    --decorrelate's statistics off in the last bit of some elements (<= 6e-17 absolute)."""
    options = dict(CASES[case])
    vectorised = options.pop("vectorised", False)
    monkeypatch.setattr(step_lib, "vectorise_members", lambda mesh: vectorised)
    cfg = Config(
        network="fc", n_hl=1, hl_size=16, batchsize=BATCH, num_epochs=1, sigma=0.125, **options
    )
    mesh = mesh_lib.make_mesh(jax.devices()[:8])
    with jax.enable_x64(True):
        monkeypatch.setattr(allreduce, "flat_sums", lambda mesh: False)
        start, tuple_state, tuple_m, tuple_text = _two_steps(cfg, mesh)
        monkeypatch.setattr(allreduce, "flat_sums", lambda mesh: True)
        _, flat_state, flat_m, flat_text = _two_steps(cfg, mesh)

    # The programs differ: XLA's combined all-reduce has an operand per array (parameters and
    # metrics), the flat step one buffer per dtype (float64 gradients and loss, float32 counts;
    # XLA keeps the two dtypes' all-reduces apart; a vmapped population's buffers have the
    # member axis in front).
    assert max(len(ops) for ops in all_reduce_operands(tuple_text)) > 2
    flat_ops = [s for ops in all_reduce_operands(flat_text) for s in ops]
    assert sorted(s.split("[")[0] for s in flat_ops) == ["f32", "f64"], flat_ops
    assert all(len(s.split(",")) == 1 + vectorised for s in flat_ops), flat_ops

    leaves = jax.tree.leaves
    assert len(leaves(flat_state)) == len(leaves(tuple_state))
    for a, b, c in zip(leaves(tuple_state), leaves(flat_state), leaves(start)):
        change = np.linalg.norm(np.asarray(a, np.float64) - c)
        assert change > 0 or a.dtype.kind != "f", "the steps did not move the state"
        assert np.linalg.norm(np.asarray(a, np.float64) - b) <= 1e-12 * change
    for k in tuple_m:
        np.testing.assert_allclose(flat_m[k], tuple_m[k], rtol=1e-12, atol=0, err_msg=k)
