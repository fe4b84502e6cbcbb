"""The train state, the data-parallel train step (NP or SGD) and the eval step.

Both steps run under `jax.shard_map` over the `data` axis: each device holds its slice of the
global batch, computes the local sum of its examples' contributions, and one `psum` over `data`
reduces them. Parameters are cast to device-varying first so that autodiff inside shard_map
does not insert its own psum (the N-times gradient trap: docs/design/distributed.md, The step).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from nodepert_dist import decorrelation, losses, optim, perturbation
from nodepert_dist.mesh import DATA, serialize_if_multiprocess_cpu

UPDATE_RULES = ("np", "sgd")
OPTIMIZERS = ("sgd", "adam")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any
    opt_state: Any
    # --decorrelate: {Decorrelate path: {"R": matrix}} (decorrelation.py); None without it, so
    # the default step's arrays and program are those of a state without the field.
    decor: Any = None


def optimizer_parts(name: str, lr: float, wd: float, *, schedule: str = "constant",
                    total_steps: int = 0, warmup_steps: int = 0, decay_every: int = 0,
                    decay_factor: float = 0.1, clip_norm: float = 0.0,
                    weight_norm: bool = False) -> list[tuple[str, optax.GradientTransformation]]:
    """The named parts `make_optimizer` chains, in order: "clip", the optimizer ("sgd" or
    "adam"), "decay", "weight_norm" (each aid only when asked for). A resumed run carries each
    part's state over by its name (resume.py)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown --optimizer={name!r}; choose one of {', '.join(OPTIMIZERS)}")
    rate = optim.lr_schedule(schedule, lr, total_steps=total_steps, warmup_steps=warmup_steps,
                             decay_every=decay_every, decay_factor=decay_factor)
    # optax.sgd / optax.adam with the lr read from the step (optim.scale_by_lr): the same
    # transformations and state as optax's own with a constant lr.
    scale = optax.identity() if name == "sgd" else optax.scale_by_adam()
    parts = [("clip", optax.clip_by_global_norm(clip_norm))] if clip_norm else []
    parts += [(name, optax.chain(scale, optim.scale_by_lr(rate)))]
    parts += [("decay", optax.add_decayed_weights(-wd))] if wd else []
    parts += [("weight_norm", optim.keep_kernel_norms())] if weight_norm else []
    return parts


def make_optimizer(name: str, lr: float, wd: float, **aids) -> optax.GradientTransformation:
    """`w <- w - lr * u(dw) - wd * w`, with u the identity (sgd) or Adam's scaling (adam).

    The decay is decoupled and not scaled by lr, as in the original research code, hence the
    negative rate given to optax's add_decayed_weights (which adds +rate * w to the update).
    Training aids (optim.py, `optimizer_parts`' keywords): `schedule` for lr over `total_steps`
    (with `warmup_steps`, and `decay_every`/`decay_factor` for step decay), `clip_norm` > 0
    clips the global gradient norm first, `weight_norm` holds every kernel at its initial norm
    after the update. Its `update` takes `step=` (the schedule's step).
    """
    parts = [t for _, t in optimizer_parts(name, lr, wd, **aids)]
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _schedule_args(cfg, steps_per_epoch: int) -> dict:
    """A Config's lr schedule settings, its epochs counted in steps."""
    return dict(schedule=cfg.lr_schedule,
                total_steps=(cfg.lr_schedule_epochs or cfg.num_epochs) * steps_per_epoch,
                warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                decay_every=cfg.lr_decay_epochs * steps_per_epoch,
                decay_factor=cfg.lr_decay_factor)


def schedule_from(cfg, steps_per_epoch: int):
    """The lr (a float, or an optax schedule of the step) of a Config's settings."""
    args = _schedule_args(cfg, steps_per_epoch)
    return optim.lr_schedule(args.pop("schedule"), cfg.lr, **args)


def optimizer_from(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """`make_optimizer` with a Config's settings."""
    return make_optimizer(cfg.optimizer, cfg.lr, cfg.wd, clip_norm=cfg.clip_norm,
                          weight_norm=cfg.weight_norm, **_schedule_args(cfg, steps_per_epoch))


def part_states(names: list[str], opt_state) -> dict:
    """{part name: its state} of a `make_optimizer` state built from parts `names`."""
    return dict(zip(names, opt_state)) if len(names) > 1 else {names[0]: opt_state}


def join_part_states(names: list[str], states: dict):
    """The inverse of `part_states`."""
    return tuple(states[n] for n in names) if len(names) > 1 else states[names[0]]


def init_state(model, optimizer, sample_x, seed: int, mesh) -> TrainState:
    """Initialise replicated parameters, optimizer state (and decorrelation matrices) on the
    mesh."""
    variables = model.init(perturbation.stream_key(seed, "init"), sample_x[:1])
    params = variables["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       decor=variables.get(decorrelation.DECOR))
    return jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))


# A local gradient: (model, params, x, labels, step, global_index) ->
# (this device's share of the global-batch gradient, per-example loss, logits).
LocalGradient = Callable[..., tuple]


def local_gradient(*, update_rule: str, loss: str, sigma: float, seed: int, global_batch: int,
                   noise: str = "rademacher", np_mode: str = "keep",
                   np_microbatches: int = 1, np_antithetic: bool = False, np_draws: int = 1,
                   np_delta: str = "finite", np_layerwise: bool = False,
                   np_estimator: str = "per_example", np_local: bool = False) -> LocalGradient:
    """The NP estimate or the backprop gradient of this device's examples, / global batch.
    np_estimator="original" reduces its loss change over the `data` axis: call it inside the
    train step's shard_map."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"unknown --update_rule={update_rule!r}; choose one of {', '.join(UPDATE_RULES)}")
    loss_fn = losses.get(loss)
    options = dict(antithetic=np_antithetic, draws=np_draws, delta=np_delta,
                   layerwise=np_layerwise, **({"local": True} if np_local else {}))
    if np_local and update_rule != "np":
        raise ValueError("--np_local is node perturbation with block-local losses; drop it "
                         "with --update_rule=sgd")
    perturbation.check_options(np_mode, np_antithetic, np_draws, np_delta,
                               estimator=np_estimator, layerwise=np_layerwise,
                               microbatches=np_microbatches, local=np_local)

    def np_grad(model, params, x, labels, step, global_index):
        keys = perturbation.example_keys(seed, step, global_index)
        return perturbation.np_gradient(model, params, x, labels, loss_fn, sigma=sigma, keys=keys,
                                        normalizer=global_batch, noise_kind=noise, mode=np_mode,
                                        microbatches=np_microbatches, **options)

    def original_np_grad(model, params, x, labels, step, global_index):
        del global_index  # one noise draw for the whole batch
        return perturbation.original_gradient(
            model, params, x, labels, loss_fn, sigma=sigma, key=perturbation.step_key(seed, step),
            normalizer=global_batch, noise_kind=noise, axis_name=DATA)

    def sgd_grad(model, params, x, labels, step, global_index):
        def summed_loss(p):
            logits = model.apply({"params": p}, x)
            example_loss = loss_fn(logits, labels)
            return jnp.sum(example_loss) / global_batch, (example_loss, logits)
        grads, (example_loss, logits) = jax.grad(summed_loss, has_aux=True)(params)
        return grads, example_loss, logits

    if update_rule == "sgd":
        return sgd_grad
    return original_np_grad if np_estimator == "original" else np_grad


def make_train_step(model, optimizer, mesh, *, global_batch: int, gradient: LocalGradient = None,
                    decorrelate_lr: float | None = None, **rule) -> Callable:
    """Returns jitted `step(state, x, labels) -> (state, metrics)` over the global batch.

    `rule` holds `local_gradient`'s settings (update_rule, loss, sigma, seed, noise, np_mode,
    np_microbatches, np_antithetic, np_draws, np_delta, np_layerwise, np_estimator, np_local);
    benchmarks pass their own `gradient` instead, to time other estimators in the same step.
    A state with decorrelation matrices (--decorrelate) needs `decorrelate_lr`: the gradient
    sees them fixed, and they then take one step of their own rule on the global batch.
    """
    gradient = gradient or local_gradient(global_batch=global_batch, **rule)

    def local_step(state: TrainState, x, labels):
        b = x.shape[0]
        params = jax.lax.pcast(state.params, DATA, to="varying")
        global_index = jax.lax.axis_index(DATA) * b + jnp.arange(b)
        net = decorrelation.bind(model, state.decor)
        grads, example_loss, logits = gradient(net, params, x, labels, state.step, global_index)
        grads = jax.lax.psum(grads, DATA)
        decor = state.decor
        if decor is not None:
            if decorrelate_lr is None:
                raise ValueError("the train state has decorrelation matrices: give "
                                 "make_train_step decorrelate_lr")
            sums = decorrelation.local_sums(model, params, decor, x)
            decor = decorrelation.update(decor, jax.lax.psum(sums, DATA), decorrelate_lr)
        metrics = jax.lax.psum({
            "loss_sum": jnp.sum(example_loss),
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "count": jnp.float32(b),
        }, DATA)
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          decor=decor), metrics

    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(DATA), P(DATA)),
                            out_specs=(P(), P()))
    return serialize_if_multiprocess_cpu(jax.jit(sharded, donate_argnums=0))


def make_eval_step(model, mesh, *, loss: str) -> Callable:
    """Returns jitted `eval(params, x, labels, mask, decor=None) -> {loss_sum, correct, count}`
    (global sums); `decor`: the state's decorrelation matrices, if any."""
    loss_fn = losses.get(loss)

    def local_eval(params, x, labels, mask, decor):
        logits = decorrelation.bind(model, decor).apply({"params": params}, x)
        return jax.lax.psum({
            "loss_sum": jnp.sum(loss_fn(logits, labels) * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "count": jnp.sum(mask),
        }, DATA)

    sharded = jax.shard_map(local_eval, mesh=mesh,
                            in_specs=(P(), P(DATA), P(DATA), P(DATA), P()), out_specs=P())

    @jax.jit
    def evaluate(params, x, labels, mask, decor=None):
        return sharded(params, x, labels, mask, decor)

    return serialize_if_multiprocess_cpu(evaluate)
