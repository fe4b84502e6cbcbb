"""--population: the grid's parsing and errors, and each member's update equal to its solo run's
(float64, 1 and 8 devices)."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nodepert_dist import mesh as mesh_lib
from nodepert_dist import models, population, run_setup
from nodepert_dist.config import Config

BATCH, STEPS_PER_EPOCH = 64, 10


def _cfg(**kw) -> Config:
    base = dict(network="fc", n_hl=1, hl_size=16, batchsize=BATCH, num_epochs=1, sigma=0.125)
    return Config(**{**base, **kw})


# ----------------------------------------------------------------------------- the grid


def test_members_in_grid_order_later_keys_fastest():
    cfg = _cfg(population="lr:0.01,0.02;seed:0,1,2")
    assert population.members(cfg) == [
        {"lr": lr, "seed": s} for lr in (0.01, 0.02) for s in (0, 1, 2)
    ]
    assert population.members(_cfg()) == [{}]
    assert list(population.values(cfg)["seed"]) == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("width:1,2", "width cannot vary within a population"),
        ("network:fc,conv", "network cannot vary within a population"),
        ("batchsize:10,20", "batchsize cannot vary within a population"),
        ("lr_decay_factor:0.1,0.5", "lr_decay_factor cannot vary within a population"),
        ("learning_rate:0.1", "unknown setting 'learning_rate'"),
        ("lr:0.1,abc", "lr='abc' is not a number"),
        ("seed:1.5", "seed='1.5' is not an integer"),
        ("seed:-1", "seeds must be in [0, 2**32)"),
        ("lr:0.1;lr:0.2", "lr is given twice"),
        ("lr:0.1,0.1", "lr lists a value twice"),
        ("lr", "expected KEY:V1,V2;KEY:V1,..."),
        ("lr:0.1,-0.2", "--population member 1 (lr=-0.2): --lr=-0.2 must be positive"),
        ("sigma:0.1,0", "--population member 1 (sigma=0): --sigma=0.0 must be positive"),
        ("wd:-1", "--population member 0 (wd=-1): --wd=-1.0 must be >= 0"),
    ],
)
def test_bad_population_is_one_line(spec, message):
    with pytest.raises(ValueError) as e:
        _cfg(population=spec).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- exactness


def _batches(n, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(BATCH, *shape)), rng.integers(0, 10, BATCH).astype(np.int32))
        for _ in range(n)
    ]


def _train(cfg: Config, mesh, batches, dtype=jnp.float64):
    """(initial state, state after `batches`, last metrics) in `dtype`, built as run_setup
    builds a run."""
    model = models.build(cfg.model, 10).clone(dtype=dtype)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    batches = [(x.astype(dtype), y) for x, y in batches]
    state = population.init_state(cfg, model, optimizer, batches[0][0], mesh)
    state = jax.tree.map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, state)
    start = jax.device_get(state)
    for x, y in batches:
        state, m = step(state, *mesh_lib.global_batch(mesh, x, y))
    return start, jax.device_get(state), jax.device_get(m)


# lr, sigma, seed and wd all vary (16 members); sigma a power of 2 (a solo run forms sigma*xi
# in the noise's float32: a power of 2 makes it exact in both). Adam: the hyperparameters reach
# a state with moments, not just the update's scale.
POPULATION = "lr:0.01,0.03;sigma:0.125,0.0625;seed:3,4;wd:0,0.001"
CHECKED = (0, 5, 10, 15)  # every key at each of its values; each pair differs in every key


# (rule, devices, dtype, the largest gap / change, vectorised, member groups): float64's is
# last-bit differences (a vmapped matmul may sum in another order, NP divides float32 loss
# changes by sigma); float32's the same at float32's last bit (~1e-7 / sigma; measured ~2e-6).
# vectorised: members under jax.vmap (accelerators) or one after another (lax.map, CPU).
# member groups M: --member_devices, the mesh member=M x data=devices/M.
CASES = [
    ("np", 1, "float64", 1e-9, True, 1),
    ("np", 8, "float64", 1e-9, False, 1),
    ("sgd", 8, "float64", 1e-9, False, 1),
    ("np", 8, "float32", 1e-5, False, 1),
    ("np", 8, "float64", 1e-9, True, 2),
    ("sgd", 8, "float64", 1e-9, False, 4),
]


# Runs (host copies, never changed) shared by the cases below: the same run is computed once.
_RUNS = {}


def _once(key, compute):
    if key not in _RUNS:
        _RUNS[key] = compute()
    return _RUNS[key]


@pytest.mark.parametrize("rule, n_devices, dtype, tolerance, vectorised, groups", CASES)
@pytest.mark.slow  # seconds of compiling: a population of 16 and 4 solo runs
def test_each_member_updates_as_its_solo_run(
    rule, n_devices, dtype, tolerance, vectorised, groups, monkeypatch
):
    """Member i's change after 2 steps equals the solo run of member i's settings (float64:
    exactly up to last bits; float32: statistically, within float32's rounding), while any two
    members' changes differ by O(1): a member that used another's seed, lr, sigma or wd fails.
    With the members spread over M device groups (solo runs on all devices' data axis), every
    member's update also equals the same population's with M=1."""
    from nodepert_dist import step as step_lib

    monkeypatch.setattr(step_lib, "vectorise_members", lambda mesh: vectorised)
    cfg = _cfg(population=POPULATION, update_rule=rule, optimizer="adam", member_devices=groups)
    mesh = mesh_lib.make_mesh(jax.devices()[:n_devices], member_devices=groups)
    solo_mesh = mesh_lib.make_mesh(jax.devices()[:n_devices])
    batches = _batches(2)
    members = population.members(cfg)
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        run = (rule, n_devices, dtype)
        pop_start, pop, pop_m = _once(
            ("population", *run, vectorised, groups), lambda: _train(cfg, mesh, batches, dt)
        )
        solos = {  # the solo runs do not depend on vectorised or groups: shared by those cases
            i: _once(
                ("solo", *run, i),
                lambda i=i: _train(
                    population.member_config(cfg, members[i]), solo_mesh, batches, dt
                ),
            )
            for i in CHECKED
        }
        one_group = groups > 1 and _once(
            ("population", *run, vectorised, 1),
            lambda: _train(dataclasses.replace(cfg, member_devices=1), solo_mesh, batches, dt),
        )
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
    member = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    if one_group:
        for i in range(len(members)):  # every member, not only those with solo runs
            change = flat(member(one_group[1], i).params) - flat(member(one_group[0], i).params)
            gap = np.linalg.norm(flat(member(pop, i).params) - flat(member(one_group[1], i).params))
            assert gap / np.linalg.norm(change) < tolerance, (i, members[i], gap)
    for i, (start, solo, solo_m) in solos.items():
        np.testing.assert_array_equal(flat(member(pop_start, i).params), flat(start.params))
        change = flat(solo.params) - flat(start.params)
        gap = np.linalg.norm(flat(member(pop, i).params) - flat(solo.params))
        assert gap / np.linalg.norm(change) < tolerance, (i, members[i], gap)
        np.testing.assert_allclose(pop_m["loss_sum"][i], solo_m["loss_sum"], rtol=tolerance)
        for j in CHECKED:  # what the comparison tells apart: another member's update
            if j != i:
                other = flat(solos[j][1].params) - flat(solos[j][0].params)
                assert np.linalg.norm(other - change) / np.linalg.norm(change) > 1e-3


# (members vectorised, devices, member groups): lax.map (CPU) and vmap on one device; lax.map
# over 2 member groups, where one group's device takes the freeze and the other does not.
@pytest.mark.parametrize(
    "vectorised, devices, groups", [(False, 1, 1), (True, 1, 1), (False, 4, 2)]
)
def test_a_frozen_member_keeps_its_state_bit_for_bit_while_the_others_update(
    vectorised, devices, groups, monkeypatch
):
    """The step's freeze on both of its paths (on the CPU the select runs only when a member is
    not kept): with every member alive each takes its update; a member whose update turns
    non-finite (a NaN planted in its kernel), or one marked frozen already, keeps its parameters
    and Adam moments bit for bit and is marked (state and metrics), while the others take
    exactly their all-alive update. Every member's step counter advances."""
    from nodepert_dist import step as step_lib

    monkeypatch.setattr(step_lib, "vectorise_members", lambda mesh: vectorised)
    cfg = _cfg(population="lr:0.01,0.03,0.05,0.07", optimizer="adam", member_devices=groups)
    mesh = mesh_lib.make_mesh(jax.devices()[:devices], member_devices=groups)
    model = models.build(cfg.model, 10)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    x, y = _batches(1)[0]
    batch = mesh_lib.global_batch(mesh, x.astype(np.float32), y)
    everyone, frozen = [True] * 4, [True, False, True, True]

    def start(plant=False, alive=everyone):
        state = population.init_state(cfg, model, optimizer, x.astype(np.float32), mesh)
        leaves, tree = jax.tree.flatten(state.params)
        if plant:  # member 1's first parameter array
            leaves[0] = leaves[0].at[(1,) + (0,) * (leaves[0].ndim - 1)].set(jnp.nan)
        state = dataclasses.replace(state, params=tree.unflatten(leaves), alive=jnp.asarray(alive))
        return state, jax.device_get(state)

    def leaves(state, i):
        return [np.asarray(a[i]) for a in jax.tree.leaves((state.params, state.opt_state))]

    healthy, before = start()
    healthy = jax.device_get(step(healthy, *batch)[0])
    assert list(healthy.alive) == everyone
    for i in range(4):  # each member moved
        assert any((a != b).any() for a, b in zip(leaves(healthy, i), leaves(before, i)))
    for state, before in (start(plant=True), start(alive=frozen)):
        after, metrics = jax.device_get(step(state, *batch))
        assert list(after.alive) == list(metrics["alive"]) == frozen
        assert list(after.step) == [1] * 4
        for a, b in zip(leaves(after, 1), leaves(before, 1)):
            np.testing.assert_array_equal(a, b)  # NaN where planted, else the start
        for i in (0, 2, 3):
            for a, b in zip(leaves(after, i), leaves(healthy, i)):
                np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- placement


def test_each_device_holds_and_trains_only_its_members(monkeypatch):
    """--member_devices=2 on 8 devices: the mesh is member=2 x data=4; every array of the
    stacked state (params, optimizer state, decorrelation matrices, step, alive marks) and the
    step's metrics are split over `member`, device d holding members [2g, 2g+2) of group
    g = d % 2 (a data position's groups are neighbours), each device's step maps over those 2
    members only (with their own values), not over all 4, and its all-reduces run over `data`
    only."""
    from nodepert_dist import step as step_lib

    mapped = []  # what each device's step maps over: its members' state and values

    def recording(fn, mesh, over_members=step_lib.over_members):
        mapped_fn = over_members(fn, mesh)
        return lambda *args: (mapped.append(jax.tree.leaves(args)), mapped_fn(*args))[1]

    monkeypatch.setattr(step_lib, "over_members", recording)
    cfg = _cfg(
        population="lr:0.01,0.02;seed:0,1", optimizer="adam", decorrelate=True, member_devices=2
    )
    mesh = mesh_lib.make_mesh(member_devices=2)
    assert dict(mesh.shape) == {mesh_lib.DATA: 4, mesh_lib.MEMBER: 2}
    model = models.build(cfg.model, 10, decorrelate=True)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    x, y = _batches(1)[0]
    x = x.astype(np.float32)
    state = population.init_state(cfg, model, optimizer, x, mesh)
    batch = mesh_lib.global_batch(mesh, x, y)
    # the step's only collectives: its sums over `data` (devices {0,2,4,6} and {1,3,5,7}: each
    # group's data axis), none across member groups, no gathers
    hlo = step.lower(state, *batch).compile().as_text()
    groups = re.findall(r"all-reduce[-\w]*\(.*?replica_groups=(\{[{}\d,]*\})", hlo)
    assert groups and set(groups) == {"{{0,2,4,6},{1,3,5,7}}"}, groups
    assert not re.search(r"all-gather|collective-permute|all-to-all", hlo)
    state, metrics = step(state, *batch)
    assert jax.tree.leaves(state.decor)
    (args,) = mapped
    assert len(args) > 10 and all(a.shape[0] == 2 for a in args)  # state leaves, lr and seed
    leaves = jax.tree.leaves((state, metrics))
    assert len(leaves) > 10 and all(a.shape[0] == 4 for a in leaves)
    for a, whole in zip(leaves, jax.tree.leaves(jax.device_get((state, metrics)))):
        assert a.sharding.spec == P(mesh_lib.MEMBER)
        for shard in a.addressable_shards:
            first = 2 * (shard.device.id % 2)
            assert shard.index[0] == slice(first, first + 2)
            np.testing.assert_array_equal(shard.data, whole[first : first + 2])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(member_devices=2), "--member_devices=2 spreads a --population's members"),
        (dict(member_devices=-1, population="lr:0.1,0.2"), "--member_devices=-1 must be >= 0"),
        (
            dict(member_devices=2, population="lr:0.1,0.2,0.3"),
            "--member_devices=2 does not divide the population's 3 members; use one of 1, 3",
        ),
    ],
)
def test_bad_member_devices_is_one_line(settings, message):
    with pytest.raises(ValueError) as e:
        _cfg(**settings).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_default_placement_takes_the_most_member_groups_the_devices_allow():
    """--member_devices=0 (the default): gcd(members, this process's 8 devices); measured the
    fastest (docs/results/population.md). Given: as given; a solo run: 1."""
    grid = lambda n: "lr:" + ",".join(str(0.01 * (i + 1)) for i in range(n))
    groups = {n: population.placement(_cfg(population=grid(n))) for n in (2, 3, 4, 6, 12, 16)}
    assert groups == {2: 2, 3: 1, 4: 4, 6: 2, 12: 4, 16: 8}
    assert population.placement(_cfg(population=grid(4), member_devices=2)) == 2
    assert population.placement(_cfg()) == 1


def test_member_groups_the_mesh_cannot_hold_are_one_line():
    """Before any work: M must divide the devices; the batch must split over the data axis
    (devices / M, not all devices); a mesh's member groups must divide the run's members."""
    for call, message in [
        (
            lambda: mesh_lib.make_mesh(member_devices=3),
            "--member_devices=3 does not divide the 8 devices; use one of 1, 2, 4, 8",
        ),
        (
            lambda: mesh_lib.check_batch(6, mesh_lib.make_mesh(member_devices=2)),
            "--batchsize=6 is not divisible by the 4 devices of the mesh's data axis "
            "(--member_devices=2)",
        ),
        (
            lambda: run_setup.check_mesh(_cfg(), mesh_lib.make_mesh(member_devices=2)),
            "the mesh has 2 member groups but the run has 1 member(s)",
        ),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)
    mesh_lib.check_batch(4, mesh_lib.make_mesh(member_devices=2))  # 4 data devices: fine


def test_a_stacked_state_restores_exactly_onto_other_member_groups(tmp_path):
    """A population's checkpoint saved from member=2 x data=4 reads back bit for bit onto
    member=4 x data=2 and member=1 x data=8, split as the target is: --member_devices may change
    on resume (config.RESUME_RULES: free)."""
    from nodepert_dist import checkpoint, checkpoint_restore
    from nodepert_dist.checkpoint_layout import step_dir

    cfg = _cfg(population="lr:0.01,0.02;seed:0,1", optimizer="adam", member_devices=2)
    model = models.build(cfg.model, 10)
    x, y = _batches(1)[0]
    x = x.astype(np.float32)
    mesh = mesh_lib.make_mesh(member_devices=2)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    state, _ = step(
        population.init_state(cfg, model, optimizer, x, mesh), *mesh_lib.global_batch(mesh, x, y)
    )
    saved = jax.device_get(state)
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(1, state, meta={"note": "test"})
    saver.wait()
    for groups in (4, 1):
        other = mesh_lib.make_mesh(member_devices=groups)
        target = population.init_state(
            dataclasses.replace(cfg, member_devices=groups), model, optimizer, x, other
        )
        restored, _ = checkpoint_restore.load(step_dir(str(tmp_path), 1), target)
        for a, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
            assert a.sharding == NamedSharding(other, P(mesh_lib.MEMBER))
            np.testing.assert_array_equal(np.asarray(a), want)


# ----------------------------------------------------------------------------- a whole run


def _run_cfg(tmp_path, name, **kw) -> Config:
    base = dict(
        n_hl=1,
        hl_size=16,
        batchsize=128,
        validation_size=59000,  # 1000 training rows: 7 steps an epoch (on the 8 devices)
        eval_train=False,
        eval_batchsize=2000,
        num_epochs=2,
        population="lr:0.01,0.05;seed:0,1",
        data_dir=tmp_path.parent / "unused",
        workdir=str(tmp_path / name),
        save_final_params=str(tmp_path / f"{name}.npz"),
    )
    return Config(**{**base, **kw})


@pytest.mark.slow  # seconds of compiling and three short runs
def test_population_run_rows_plot_and_exact_resume(tmp_path, mnist_dir):
    """Rows per member (index and settings), member-wise eval, nodepert-plot's curves, and a
    run stopped mid-epoch (--max_steps) and resumed ends with the uninterrupted run's params
    and rows; changing the population, or the optimizer's parts, on resume is refused."""
    from nodepert_dist import plot, run_record, train

    whole = _run_cfg(tmp_path, "whole", data_dir=mnist_dir)
    rows, _ = train.run(whole)
    assert [(r["epoch"], r["member"], r["lr"], r["seed"]) for r in rows] == [
        (e, i, lr, s)
        for e in range(3)
        for i, (lr, s) in enumerate([(0.01, 0), (0.01, 1), (0.05, 0), (0.05, 1)])
    ]
    # each member evaluated with its own params: at epoch 0 the seed alone decides
    acc0 = [r["test_acc"] for r in rows[:4]]
    assert acc0[0] == acc0[2] and acc0[1] == acc0[3] and acc0[0] != acc0[1]
    assert len({r["test_acc"] for r in rows[-4:]}) == 4
    assert run_record.read_metrics(whole.workdir) == rows
    with open(os.path.join(whole.workdir, "config.json")) as f:  # the default placement
        assert json.load(f)["machine"]["member_devices"] == 4  # member=4 x data=2
    with open(os.path.join(whole.workdir, "metrics.csv")) as f:
        assert f.readline().startswith("epoch,member,lr,seed,step,")
    curves = plot.curves(whole.workdir)
    assert [c[0].split(", member ")[1] for c in curves] == [
        "0: lr=0.01, seed=0",
        "1: lr=0.01, seed=1",
        "2: lr=0.05, seed=0",
        "3: lr=0.05, seed=1",
    ]
    assert [c[2] for c in curves] == [[r["test_acc"] for r in rows[i::4]] for i in range(4)]

    cut = _run_cfg(tmp_path, "cut", data_dir=mnist_dir, checkpoint_every_steps=0)
    _, note = train.run(dataclasses.replace(cut, max_steps=10))  # mid-epoch 2
    assert note.startswith("stopped at --max_steps=10")
    with pytest.raises(ValueError, match="--population"):
        train.run(dataclasses.replace(cut, population="lr:0.01,0.05;seed:0,2"))
    with pytest.raises(ValueError, match="resumes with the optimizer parts it was saved with"):
        train.run(dataclasses.replace(cut, optimizer="adam"))
    resumed, _ = train.run(cut)
    timing = ("epoch_time", "examples_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
    assert strip(resumed) == strip(rows)
    a, b = np.load(whole.save_final_params), np.load(cut.save_final_params)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape[0] == 4
        np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------- per-member guard


@pytest.mark.slow  # seconds of compiling and a short run
def test_a_diverging_member_is_frozen_and_marked_while_the_others_go_on(tmp_path, mnist_dir):
    """lr 1e6 (SGD, ce) diverges in epoch 1: that member is frozen at its last finite state
    with a member_diverged event row; member 0 trains on and the run ends normally. When
    every member diverges the run stops with one line."""
    from nodepert_dist import crash_guard, run_record, train

    cfg = _run_cfg(
        tmp_path,
        "div",
        data_dir=mnist_dir,
        update_rule="sgd",
        loss="ce",
        population="lr:0.05,1e6",
    )
    rows, note = train.run(cfg)
    assert note == ""
    events = [r for r in run_record.read_metrics(cfg.workdir) if "event" in r]
    assert [(e["event"], e["member"], e["lr"], e["epoch"]) for e in events] == [
        ("member_diverged", 1, 1e6, 1)
    ]
    last = {r["member"]: r for r in rows if r["epoch"] == 2}
    assert last[0]["test_acc"] > 0.5 and last[0]["mean_step_loss"] > 0
    params = np.load(cfg.save_final_params)
    assert all(np.isfinite(v).all() for v in params.values())  # frozen, not NaN
    with pytest.raises(crash_guard.Diverged, match="every member of --population diverged"):
        train.run(dataclasses.replace(cfg, workdir=str(tmp_path / "all"), population="lr:1e6,2e6"))


def test_crash_guard_freezes_a_crashed_member_only():
    """--crash_guard in a population: the member whose latest test accuracy fell more than
    --crash_points below its best is frozen (alive False, member_crashed event); a member
    that never got better, or that is already frozen, is left alone."""
    from nodepert_dist import step as step_lib

    cfg = _cfg(population="lr:0.01,0.02,0.03", crash_guard=True, workdir="/nonexistent/unused")
    state = step_lib.TrainState(step=jnp.zeros(3), params={}, opt_state=(), alive=jnp.ones(3, bool))
    watch = population.Watch(cfg, state)
    accs = [(0.9, 0.9, 0.1), (0.95, 0.5, 0.1)]  # member 1 drops 45 points; member 2 flat
    rows = [
        {"epoch": e, "step": e, "member": i, "test_acc": a}
        for e, epoch_accs in enumerate(accs)
        for i, a in enumerate(epoch_accs)
    ]
    events = []
    watch._event = lambda name, i, **detail: events.append((name, i, detail["best_test_acc"]))
    state = watch.after_epoch(state, rows)
    assert list(np.asarray(state.alive)) == [True, False, True]
    assert events == [("member_crashed", 1, 0.9)]
    rows += [{"epoch": 2, "step": 2, "member": i, "test_acc": 0.0} for i in range(3)]
    state = watch.after_epoch(state, rows)  # member 0 crashes now; 1 is frozen already
    assert list(np.asarray(state.alive)) == [False, False, True]
    assert events[1:] == [("member_crashed", 0, 0.95)]
    off = population.Watch(dataclasses.replace(cfg, crash_guard=False), state)
    assert off.after_epoch(state, rows) is state


def test_a_solo_run_compiles_the_step_it_compiled_before_populations():
    """No population: run_setup's step (through population.rule) lowers to the program of the
    plain step.make_train_step with optim.optimizer_from, text for text; no vmap, no freeze."""
    import re

    from nodepert_dist import optim
    from nodepert_dist import step as step_lib

    cfg = _cfg(optimizer="adam", wd=1e-3).resolved()
    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    model = models.build(cfg.model, 10)
    x, y = _batches(1)[0]
    x = x.astype(np.float32)
    optimizer, step = run_setup.make_train_step(cfg, model, mesh, STEPS_PER_EPOCH)
    plain_opt = optim.optimizer_from(cfg.optim, cfg.num_epochs, STEPS_PER_EPOCH)
    plain = step_lib.make_train_step(
        model,
        plain_opt,
        mesh,
        update_rule="np",
        loss=cfg.loss,
        seed=cfg.seed,
        global_batch=BATCH,
        np=cfg.np,
    )
    state = population.init_state(cfg, model, optimizer, x, mesh)
    assert state.alive is None
    text = lambda f: re.sub(r"loc\(.*?\)", "", f.lower(state, x, y).as_text())
    assert text(step) == text(plain)
