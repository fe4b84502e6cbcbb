"""The probe library of the experiments: statistics of the run's NP estimate against the true
gradient (`jax.grad`) on one batch, the probe batch, the every-k-steps `Hook`, result rows.

The estimate probed is exactly the one the run trains with: `np_estimate` calls the run's own
local gradient (`run_setup.Run.gradient`: every NP setting of the run, --np_draws,
--np_layerwise, --np_antithetic, --np_delta, --np_estimator, --np_local, --noise, --sigma), in a
shard_map over one device as the train step does; only the noise keys differ (steps counted
down from `_STATS_STEP`, never a real step).

`probe_fn(...)` returns a jitted `f(params, x, labels) -> {name: scalar}` with, per layer (each
top-level parameter module, e.g. `layer0`) and for the whole network (`all`):
  angle        degrees between one NP estimate and the true gradient
  angle_mean   the same for the mean of `draws` NP estimates (-> 0 as draws grow: unbiased)
  sign_sym     fraction of entries where one NP estimate and the true gradient agree in sign
               (an entry whose true gradient is exactly 0, e.g. into a dead ReLU, agrees only
               if NP's is 0 too; NP's is not: its noise term reaches dead units)
  zero_grad    fraction of entries whose true gradient is exactly 0
  norm_np, norm_sgd, ratio = norm_np / norm_sgd (the NP/SGD step-size ratio at the same lr)
  var          total variance of the NP estimate over draws (sum over entries), and
  rel_var      var / norm_sgd^2
plus `loss` (the probe batch's mean loss). With `norms=True` also `w_norm` (parameters) and
`act_norm` (mean L2 norm per example of each layer's output, via flax capture_intermediates).

`Hook` runs it every k steps inside the training loop (`train.run(cfg, hooks=[...])`): a
separate jitted function on one device's copy of the parameters, called only on the steps it
measures, so the other steps run exactly as without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nodepert_dist import files, losses, metrics
from nodepert_dist.data import preprocess
from nodepert_dist.mesh import DATA

# NP draws of the statistics use noise keys of steps counted down from here, never a real step.
_STATS_STEP = 2**31 - 1


def np_estimate(gradient, model, params, x, labels, step):
    """The estimate `gradient` (a `step.local_gradient`, e.g. `Run.gradient(n, "np")`) gives
    at `step` on these examples, computed as the train step does (parameters cast to
    device-varying, a psum over `data`) on a one-device mesh: the same program on one device,
    so --np_estimator=original's batch-wide reduction works here too."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), (DATA,))

    def local(params, x, labels, step):
        varying = jax.lax.pcast(params, DATA, to="varying")
        grads = gradient(model, varying, x, labels, step, jnp.arange(x.shape[0]))[0]
        return jax.lax.psum(grads, DATA)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P()), out_specs=P())(
        params, x, labels, step
    )


def np_estimates(gradient, model, params, x, labels, draws: int):
    """`draws` estimates (stacked on a leading axis), at noise steps _STATS_STEP, -1, ..."""
    return jax.lax.map(
        lambda d: np_estimate(gradient, model, params, x, labels, _STATS_STEP - d),
        jnp.arange(draws),
    )


def flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])


def angle_deg(a, b):
    # float32 on every backend: a GPU's default precision (TF32) would blur angles near 0.
    cos = jnp.dot(a, b, precision="highest") / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def sign_symmetry(a, b):
    return jnp.mean((jnp.sign(a) == jnp.sign(b)).astype(jnp.float32))


def groups(params) -> dict:
    """{'layer0': subtree, ..., 'all': params}: per top-level parameter module, and the whole."""
    return {**{k: params[k] for k in sorted(params)}, "all": params}


def compare(true_grad, estimate) -> dict:
    """Angle, sign symmetry and norms of `estimate` against `true_grad`, per layer and whole."""
    out = {}
    for name in groups(true_grad):
        r, e = flat(groups(true_grad)[name]), flat(groups(estimate)[name])
        out.update(
            {
                f"{name}_angle": angle_deg(r, e),
                f"{name}_sign_sym": sign_symmetry(r, e),
                f"{name}_norm_sgd": jnp.linalg.norm(r),
                f"{name}_norm_np": jnp.linalg.norm(e),
                f"{name}_ratio": jnp.linalg.norm(e) / jnp.linalg.norm(r),
                f"{name}_zero_grad": jnp.mean((r == 0).astype(jnp.float32)),
            }
        )
    return out


def activity_norms(model, params, x) -> dict:
    """Mean per-example L2 norm of every layer's output (generic: flax capture_intermediates)."""
    _, state = model.apply(
        {"params": params}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    out = {}
    for name in sorted(params):
        (a,) = state["intermediates"][name]["__call__"]
        out[f"{name}_act_norm"] = jnp.mean(jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=1))
    return out


def probe_fn(model, gradient, *, loss: str, draws: int, norms: bool = False):
    """Jitted `f(params, x, labels) -> dict of scalars` (see the module docstring); `gradient`:
    the run's NP estimator for the probe batch (`Run.gradient(batch, update_rule="np")`)."""
    loss_fn = losses.get(loss)

    def stats(params, x, labels):
        def mean_loss(p):
            return jnp.mean(loss_fn(model.apply({"params": p}, x), labels))

        value, true_grad = jax.value_and_grad(mean_loss)(params)
        draws_ = np_estimates(gradient, model, params, x, labels, draws)
        first = jax.tree.map(lambda a: a[0], draws_)
        mean = jax.tree.map(lambda a: jnp.mean(a, 0), draws_)
        out = {"loss": value, **compare(true_grad, first)}
        for name in groups(true_grad):
            r = flat(groups(true_grad)[name])
            out[f"{name}_angle_mean"] = angle_deg(r, flat(groups(mean)[name]))
            if draws > 1:
                per_draw = jax.vmap(flat)(groups(draws_)[name])
                var = jnp.sum(jnp.var(per_draw, axis=0, ddof=1))
                out[f"{name}_var"], out[f"{name}_rel_var"] = var, var / jnp.sum(r * r)
            if norms:
                out[f"{name}_w_norm"] = jnp.linalg.norm(flat(groups(params)[name]))
        if norms:
            out.update(activity_norms(model, params, x))
        return out

    return jax.jit(stats)


def local_copy(tree):
    """This process's first device's copy of a replicated pytree (one device computes)."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)


def check_probe_size(size: int, cfg) -> None:
    """One line if the run's --np_microbatches does not split a probe batch of `size`."""
    if size % cfg.np_microbatches:
        raise ValueError(
            f"the probe batch of {size} examples does not split into "
            f"--np_microbatches={cfg.np_microbatches}; use a probe size that is a "
            f"multiple of it"
        )


def probe_batch(data, splits, prep_mode: str, size: int, seed: int):
    """`size` fixed training examples (a seeded choice), preprocessed like the train batches."""
    lo, hi = splits["train"]
    rows = (
        np.sort(
            np.random.default_rng([seed, 7919]).choice(hi - lo, min(size, hi - lo), replace=False)
        )
        + lo
    )
    stats = preprocess.statistics(data.root, data.train_x, prep_mode, lo, hi)
    x = preprocess.apply(np.asarray(data.train_x[rows]), prep_mode, stats)
    return np.asarray(x, np.float32), np.asarray(data.train_y[rows], np.int32)


def layer_names(rows: list[dict]) -> list[str]:
    """The layers named in statistics rows (`layer0_angle` -> `layer0`)."""
    return sorted({k[: -len("_angle")] for k in rows[0] if k.endswith("_angle")} - {"all"})


class Hook:
    """Training-loop hook: the statistics every `every` steps on a fixed probe batch -> JSONL,
    of the estimator the run trains with (all its NP settings).

    Resumable: at the start it drops rows past the step the run resumes from."""

    def __init__(
        self,
        path: str,
        every: int,
        draws: int = 4,
        probe_size: int = 512,
        norms: bool = False,
        at_start: bool = False,
    ):
        self.path, self.every, self.draws, self.size, self.norms = (
            path,
            every,
            draws,
            probe_size,
            norms,
        )
        self.at_start = at_start  # also measure the step the run starts or resumes from

    def start(self, ctx) -> None:
        cfg = ctx.cfg
        if ctx.state.decor is not None:  # the probe is compiled once, R moves every step
            raise ValueError("the gradient-statistics probe does not take --decorrelate; drop it")
        x, y = probe_batch(ctx.data, ctx.splits, ctx.prep_mode, self.size, cfg.seed)
        check_probe_size(len(y), cfg)
        self.fn = probe_fn(
            ctx.model,
            ctx.run.gradient(len(y), update_rule="np"),
            loss=cfg.loss,
            draws=self.draws,
            norms=self.norms,
        )
        device = jax.local_devices()[0]
        self.x, self.y = jax.device_put(x, device), jax.device_put(y, device)
        self.steps_per_epoch = ctx.steps_per_epoch
        if metrics.is_writer():
            files.write_jsonl(
                self.path, [r for r in files.read_jsonl(self.path) if r["step"] < ctx.step]
            )
        if self.at_start or ctx.step % self.every == 0:
            self.measure(ctx.step, ctx.state)

    def after_step(self, step, state, *_) -> None:
        if step % self.every == 0:
            self.measure(step, state)

    def measure(self, step, state) -> None:
        values = jax.device_get(self.fn(local_copy(state.params), self.x, self.y))
        row = {
            "step": step,
            "epoch": step / self.steps_per_epoch,
            **{k: float(v) for k, v in values.items()},
        }
        if metrics.is_writer():
            files.append_jsonl(self.path, [row])
