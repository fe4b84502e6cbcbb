"""The train state, the data-parallel train step (NP or SGD) and the eval step.

Both steps run under `jax.shard_map` over the `data` axis: each device holds its slice of the
global batch, computes the local sum of its examples' contributions, and one `psum` over `data`
reduces them. A population's stacked state is split over the `member` axis (--member_devices):
each device maps over its own members only, on the batch it holds (replicated over `member`).
Parameters are cast to device-varying first so that autodiff inside shard_map does not insert
its own psum (the N-times gradient trap: docs/design/distributed.md, The step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from nodepert_dist import allreduce, decorrelation, estimator, losses, perturbation
from nodepert_dist import settings as settings_lib
from nodepert_dist.estimator import NPSettings
from nodepert_dist.mesh import DATA, MEMBER, serialize_if_multiprocess_cpu
from nodepert_dist.settings import setting

UPDATE_RULES = ("np", "sgd")
_T = "training"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any
    opt_state: Any
    # --decorrelate: {Decorrelate path: {"R": matrix}} (decorrelation.py); None without it, so
    # the default step's arrays and program are those of a state without the field.
    decor: Any = None
    # --population: per member, False once frozen (population.Watch); None for a solo run.
    alive: Any = None


def init_state(model, optimizer, sample_x, seed: int, mesh) -> TrainState:
    """Initialise replicated parameters, optimizer state (and decorrelation matrices) on the
    mesh."""
    variables = model.init(perturbation.stream_key(seed, "init"), sample_x[:1])
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        decor=variables.get(decorrelation.DECOR),
    )
    return jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))


def over_members(fn, mesh) -> Callable:
    """`fn` over the leading member axis of its arguments (a --population). On accelerators
    vectorised (jax.vmap: the members' work batched fills the device); on CPU one member after
    another (jax.lax.map): there vmap's batched matmuls and the transposes it adds to fold
    members into shared-input matmuls measured ~2x slower per member than lax.map, whose
    members compute with a solo run's shapes (docs/results/population.md)."""
    if vectorise_members(mesh):
        return jax.vmap(fn)
    return lambda *args: jax.lax.map(lambda a: fn(*a), args)


def vectorise_members(mesh) -> bool:
    """Whether a population's members are vectorised (jax.vmap) on this mesh: off CPU."""
    return mesh.devices.flat[0].platform != "cpu"


# A local gradient: (model, params, x, labels, step, global_index) ->
# (this device's share of the global-batch gradient, per-example loss, logits).
LocalGradient = Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The update rule and the loop's settings; part of config.Config."""

    update_rule: str = setting(
        "np", "np: node perturbation; sgd: backprop gradients.", group=_T, choices=UPDATE_RULES
    )
    batchsize: int = setting(
        128, "Global batch size, over all devices (the original code used 100).", group=_T
    )
    num_epochs: int = setting(10, "Epochs to train.", group=_T)
    seed: int = setting(0, "Seed of parameters, data order and noise.", group=_T)
    loss: str = setting("mse", "mse (sigmoid outputs) or ce.", group=_T, choices=losses.LOSSES)
    max_steps: int = setting(
        0, "Stop after this many updates in all (0: no limit); a later run resumes.", group=_T
    )
    metrics_every: int = setting(
        50,
        "Read the training metrics from the device every N steps (and at every checkpoint, "
        "stop and epoch end); the steps in between never wait for the host. A non-finite "
        "loss stops the run at the next read (naming its step; nothing after it is saved). "
        "The epoch rows are the same for any N.",
        group=_T,
    )
    steps_per_call: int = setting(
        1,
        "Run K steps per compiled call (a scan over K stacked batches): less host work per "
        "step; same updates and metrics. An epoch's last steps (its steps mod K) run as one "
        "call; before a closer --max_steps or step checkpoint, calls of that size or single "
        "steps.",
        group=_T,
    )
    hang_timeout_s: float = setting(
        1800.0,
        "Exit (code 4, one line) when no training step finishes for this many seconds after "
        "the first: a collective waiting forever for a stopped process or GPU (0: never).",
        group=_T,
    )
    population: str = setting(
        "",
        "Train a grid of members in one compiled step, e.g. 'lr:0.01,0.02;seed:0,1' (4 "
        "members, numbered in the grid's order: later keys vary fastest). Members may vary "
        "lr, sigma, seed (init and noise; the data order stays --seed's) and wd; they share "
        "every batch. metrics.jsonl rows carry each member's index and values; a member that "
        "diverges is frozen (an event row) while the others go on.",
        group=_T,
    )
    member_devices: int = setting(
        0,
        "Spread --population's members over M groups of devices: the mesh becomes member=M x "
        "data=devices/M, each device holds and trains only its group's members, and batches "
        "split over data only. 0: as many groups as the members and each process's devices "
        "allow (measured fastest, and the least memory: docs/results/population.md); 1: every "
        "device holds every member. M must divide the members and each process's devices.",
        group=_T,
    )

    def validate(self) -> None:
        settings_lib.check_choices(self)
        settings_lib.check_positive(self, "batchsize", "metrics_every", "steps_per_call")
        settings_lib.check_non_negative(
            self, "num_epochs", "max_steps", "hang_timeout_s", "member_devices"
        )


def local_gradient(
    *, update_rule: str, loss: str, seed: int, global_batch: int, np: NPSettings = NPSettings()
) -> LocalGradient:
    """The NP estimate (of the estimator `np` describes: estimator.build) or the backprop
    gradient of this device's examples, / global batch. np_estimator="original" reduces its
    loss change over the `data` axis: call it inside the train step's shard_map."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(
            f"unknown --update_rule={update_rule!r}; choose one of {', '.join(UPDATE_RULES)}"
        )
    loss_fn = losses.get(loss)
    if update_rule == "np":
        return estimator.build(np, loss_fn, seed=seed, global_batch=global_batch, axis_name=DATA)
    if np.np_local:
        raise ValueError(
            "--np_local is node perturbation with block-local losses; drop it "
            "with --update_rule=sgd"
        )

    def sgd_grad(model, params, x, labels, step, global_index):
        def summed_loss(p):
            logits = model.apply({"params": p}, x)
            example_loss = loss_fn(logits, labels)
            return jnp.sum(example_loss) / global_batch, (example_loss, logits)

        grads, (example_loss, logits) = jax.grad(summed_loss, has_aux=True)(params)
        return grads, example_loss, logits

    return sgd_grad


def make_train_step(model, optimizer, mesh, **kwargs) -> Callable:
    """Returns jitted `step(state, x, labels) -> (state, metrics)` over the global batch
    (`sharded_train_step`'s, the state donated). The trainer's loop compiles the same function
    with its preprocessing and metric log around it (loop_step.py)."""
    return jit_train_step(sharded_train_step(model, optimizer, mesh, **kwargs))


def jit_train_step(sharded: Callable) -> Callable:
    """`sharded_train_step`'s function compiled on its own, the state donated."""
    return serialize_if_multiprocess_cpu(jax.jit(sharded, donate_argnums=0))


def sharded_train_step(
    model,
    optimizer,
    mesh,
    *,
    global_batch: int,
    gradient: LocalGradient = None,
    decorrelate_lr: float | None = None,
    members: dict | None = None,
    member_rule: Callable | None = None,
    **rule,
) -> Callable:
    """`step(state, x, labels) -> (state, metrics)` over the global batch, not yet jitted.

    `rule` holds `local_gradient`'s settings (update_rule, loss, seed and `np`, the NPSettings);
    benchmarks pass their own `gradient` instead, to time other estimators in the same step.
    A state with decorrelation matrices (--decorrelate) needs `decorrelate_lr`: the gradient
    sees them fixed, and they then take one step of their own rule on the global batch.

    A population (--population; population.py): `members` {setting: array over members} and
    `member_rule(values) -> (gradient, optimizer)` of one member's traced values. The state is
    stacked on a leading member axis split over the mesh's `member` axis (the values too), the
    same update is mapped over each device's members (`over_members`; every member sees the same
    batch) and the metrics get that axis too. Without them, the solo step.
    """
    if members is None:
        gradient = gradient or local_gradient(global_batch=global_batch, **rule)
    flat = allreduce.flat_sums(mesh)  # one buffer per dtype where that pays (allreduce.py)

    def update(state: TrainState, x, labels, gradient, optimizer):
        b = x.shape[0]
        params = jax.lax.pcast(state.params, DATA, to="varying")
        global_index = jax.lax.axis_index(DATA) * b + jnp.arange(b)
        net = decorrelation.bind(model, state.decor)
        grads, example_loss, logits = gradient(net, params, x, labels, state.step, global_index)
        decor = state.decor
        if decor is not None and decorrelate_lr is None:
            raise ValueError(
                "the train state has decorrelation matrices: give make_train_step decorrelate_lr"
            )
        local = {
            "grads": grads,
            "decor": None if decor is None else decorrelation.local_sums(model, params, decor, x),
            "metrics": {
                "loss_sum": jnp.sum(example_loss),
                "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                "count": jnp.float32(b),
            },
        }
        sums = allreduce.psum(local, DATA, flat=flat)  # every sum of the step at once
        grads, metrics = sums["grads"], sums["metrics"]
        if decor is not None:
            decor = decorrelation.update(decor, sums["decor"], decorrelate_lr)
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, step=state.step
        )
        params = optax.apply_updates(state.params, updates)
        return TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, decor=decor
        ), metrics

    def local_step(state: TrainState, x, labels, members):  # members: this device's values
        if members is None:
            return update(state, x, labels, gradient, optimizer)

        def member(state, values):  # one member's update, its settings traced
            new, metrics = update(state, x, labels, *member_rule(values))
            finite = jnp.isfinite(metrics["loss_sum"])
            for leaf in jax.tree.leaves((new.params, new.opt_state, new.decor)):
                if jnp.issubdtype(leaf.dtype, jnp.inexact):
                    finite &= jnp.all(jnp.isfinite(leaf))
            keep = state.alive & finite
            return dataclasses.replace(new, alive=keep), {**metrics, "alive": keep}

        new, metrics = over_members(member, mesh)(state, members)
        # A member whose loss or state turns non-finite is frozen at its last finite state
        # (alive False for good); the others go on. On the CPU the select runs only in a step
        # where some member is not kept: selecting every step cost ~15% of an fc member's step.
        keep, tree = new.alive, (new.params, new.opt_state, new.decor)

        def freeze(tree):
            def select(n, o):
                return jnp.where(keep.reshape(keep.shape + (1,) * (n.ndim - 1)), n, o)

            return jax.tree.map(select, tree, (state.params, state.opt_state, state.decor))

        if vectorise_members(mesh):  # on a GPU a cond reads its predicate on the host: a sync
            params, opt_state, decor = freeze(tree)
        else:
            params, opt_state, decor = jax.lax.cond(jnp.all(keep), lambda t: t, freeze, tree)
        return TrainState(new.step, params, opt_state, decor, alive=keep), metrics

    spec = P() if members is None else P(MEMBER)  # the state's (and its metrics')
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(spec, P(DATA), P(DATA), spec), out_specs=(spec, spec)
    )
    return lambda state, x, labels: sharded(state, x, labels, members)


def make_eval_step(
    model, mesh, *, loss: str, population: bool = False, prep: tuple | None = None
) -> Callable:
    """Returns jitted `eval(params, x, labels, mask, decor=None) -> {loss_sum, correct, count}`
    (global sums); `decor`: the state's decorrelation matrices, if any. `population`: params
    (and decor) stacked on a member axis, the sums per member. `prep`: (fn, consts) of
    preprocess.device_parts, applied to x inside the same program (x: the uint8 batch)."""
    loss_fn = losses.get(loss)
    flat = allreduce.flat_sums(mesh)

    def one_eval(params, x, labels, mask, decor):
        logits = decorrelation.bind(model, decor).apply({"params": params}, x)
        return allreduce.psum(
            {
                "loss_sum": jnp.sum(loss_fn(logits, labels) * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                "count": jnp.sum(mask),
            },
            DATA,
            flat=flat,
        )

    def local_eval(params, x, labels, mask, decor):
        if not population:
            return one_eval(params, x, labels, mask, decor)
        return over_members(lambda p, d: one_eval(p, x, labels, mask, d), mesh)(params, decor)

    spec = P(MEMBER) if population else P()  # params, decor and the sums
    sharded = jax.shard_map(
        local_eval, mesh=mesh, in_specs=(spec, P(DATA), P(DATA), P(DATA), spec), out_specs=spec
    )

    @jax.jit
    def evaluate(params, x, labels, mask, decor=None, consts=None):
        return sharded(params, x if prep is None else prep[0](x, consts), labels, mask, decor)

    consts = None if prep is None else prep[1]
    return serialize_if_multiprocess_cpu(
        lambda params, x, labels, mask, decor=None: evaluate(params, x, labels, mask, decor, consts)
    )
