"""landscape: the loss surface around the final point, with the training trajectory drawn on it.

    python -m nodepert_dist.experiments landscape --every=50 --grid=25 --num_epochs=5

While training, the parameters are stored every --every steps (<out>/run/trajectory/*.npy; a
rerun resumes the run and drops snapshots past its checkpoint). Then:
  - PCA of the trajectory (snapshots minus the final point): the top-2 components;
  - both directions filter-normalised (Li et al. 2018): each output unit's (filter's) slice of
    a direction rescaled to the norm of that unit's weights at the final point; biases 0;
  - every snapshot projected on the two directions (least squares), and the loss on a
    --grid x --grid lattice around the final point (--surface_size training examples).
Writes landscape.csv (alpha, beta, loss, acc), landscape_trajectory.csv (step, alpha, beta, loss)
and landscape.png (log10 loss contours with the trajectory).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.flatten_util import ravel_pytree

from nodepert_dist import checkpoint_layout, files, losses, metrics
from nodepert_dist.experiments import common, probes

flags.DEFINE_integer("every", 50, "Store the parameters every this many steps (and at step 0).")
flags.DEFINE_integer("grid", 25, "Surface lattice points per axis.")
flags.DEFINE_integer("surface_size", 2000, "Training examples the surface loss is measured on.")
FLAGS = flags.FLAGS


class TrajectoryHook:
    """Training-loop hook: the flattened parameters every `every` steps -> one .npy each."""

    def __init__(self, folder: str, every: int):
        self.folder, self.every = folder, every

    def start(self, ctx) -> None:
        if metrics.is_writer():
            os.makedirs(self.folder, exist_ok=True)
            for path in snapshot_paths(self.folder):
                if _step_of(path) > ctx.step:  # past the checkpoint this run resumes from
                    os.remove(path)
        self.after_step(ctx.step, ctx.state)

    def after_step(self, step, state, *_) -> None:
        if step % self.every or not metrics.is_writer():
            return
        vector = np.asarray(ravel_pytree(probes.local_copy(state.params))[0], np.float32)
        path = os.path.join(self.folder, f"step_{step:08d}.npy")
        with files.atomic_open(path, "wb") as f:
            np.save(f, vector)


def snapshot_paths(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "step_*.npy")))


def _step_of(path: str) -> int:
    return int(os.path.basename(path)[5:-4])


def filter_normalize(direction, params):
    """Each output unit's slice (last axis of a kernel) rescaled to that unit's norm in params."""

    def one(d, p):
        if p.ndim < 2:
            return jnp.zeros_like(d)
        axes = tuple(range(p.ndim - 1))
        return d * jnp.linalg.norm(p, axis=axes) / (jnp.linalg.norm(d, axis=axes) + 1e-12)

    return jax.tree.map(one, direction, params)


def surface_fn(model, loss: str):
    """Jitted f(final, d1, d2, coords (n, 2), x, y) -> (loss, acc) at final + a d1 + b d2."""
    loss_fn = losses.get(loss)

    def f(template, final, d1, d2, coords, x, y):
        _, unravel = ravel_pytree(template)  # the params' tree structure and shapes

        def point(ab):
            logits = model.apply({"params": unravel(final + ab[0] * d1 + ab[1] * d2)}, x)
            return jnp.mean(loss_fn(logits, y)), jnp.mean(jnp.argmax(logits, -1) == y)

        return jax.lax.map(point, coords)

    return jax.jit(f)


def analyse(cfg, folder, grid, surface_size):
    last = checkpoint_layout.committed_steps(os.path.join(cfg.workdir, "checkpoints"))
    if not last:
        raise common.ExperimentError(f"{cfg.workdir} has no checkpoint of the final point")
    run, model, params = common.load_point(cfg, last[-1])
    final, unravel = ravel_pytree(params)
    paths = [p for p in snapshot_paths(folder) if _step_of(p) < last[-1]]
    if len(paths) < 2:
        raise common.ExperimentError(f"{folder}: fewer than 2 trajectory snapshots; lower --every")
    steps = [_step_of(p) for p in paths] + [last[-1]]
    traj = np.stack([np.load(p) for p in paths] + [np.asarray(final)])
    diffs = traj - np.asarray(final)[None]
    _, s, vt = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    explained = (s**2 / np.sum(s**2))[:2]
    dirs = [ravel_pytree(filter_normalize(unravel(jnp.asarray(v)), params))[0] for v in vt[:2]]
    basis = np.stack([np.asarray(d) for d in dirs], 1)  # (P, 2)
    coords = np.linalg.lstsq(basis, diffs.T, rcond=None)[0].T  # (T, 2)
    lo, hi = coords.min(0), coords.max(0)
    margin = np.maximum(0.25 * (hi - lo), 0.05)
    axes = [np.linspace(lo[i] - margin[i], hi[i] + margin[i], grid) for i in range(2)]
    lattice = np.array([(a, b) for b in axes[1] for a in axes[0]], np.float32)
    x, y = probes.probe_batch(run.data, run.splits, run.prep_mode, surface_size, cfg.seed)
    device = jax.local_devices()[0]
    put = lambda v: jax.device_put(jnp.asarray(v), device)
    f = surface_fn(model, cfg.loss)
    loss, acc = jax.device_get(
        f(params, put(final), put(dirs[0]), put(dirs[1]), put(lattice), put(x), put(y))
    )
    # the trajectory's own loss (at the stored points, not their projections): the surface at
    # (0, 0) around each of them
    at_point = np.zeros((1, 2), np.float32)
    traj_loss = [
        float(
            jax.device_get(
                f(params, put(t), put(dirs[0]), put(dirs[1]), put(at_point), put(x), put(y))
            )[0][0]
        )
        for t in traj
    ]
    surface = [
        {"alpha": float(a), "beta": float(b), "loss": float(l), "acc": float(c)}
        for (a, b), l, c in zip(lattice, loss, acc)
    ]
    path = [
        {"step": s_, "alpha": float(c[0]), "beta": float(c[1]), "loss": l}
        for s_, c, l in zip(steps, coords, traj_loss)
    ]
    return surface, path, explained


def plot(surface, path, explained, out_png, title) -> str:
    fig, axes = common.figure(size=(6.4, 5.2))
    ax = axes[0, 0]
    a = np.array(sorted({r["alpha"] for r in surface}))
    b = np.array(sorted({r["beta"] for r in surface}))
    z = np.array([r["loss"] for r in surface]).reshape(len(b), len(a))
    cs = ax.contourf(a, b, np.log10(np.maximum(z, 1e-12)), levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log10 loss")
    ax.plot(
        [r["alpha"] for r in path], [r["beta"] for r in path], "w.-", ms=3, lw=1, label="trajectory"
    )
    ax.plot(path[0]["alpha"], path[0]["beta"], "wo", ms=6, label=f"step {path[0]['step']}")
    ax.plot(
        path[-1]["alpha"], path[-1]["beta"], "r*", ms=12, label=f"final (step {path[-1]['step']})"
    )
    ax.set_xlabel(f"PC1, filter-normalised ({100 * explained[0]:.0f}% of the trajectory variance)")
    ax.set_ylabel(f"PC2, filter-normalised ({100 * explained[1]:.0f}%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return common.save_figure(fig, out_png)


def run(base, out, every=50, grid=25, surface_size=2000) -> list[str]:
    if every <= 0 or grid < 2 or surface_size <= 0:
        raise common.ExperimentError("--every > 0, --grid >= 2, --surface_size > 0")
    cfg = dataclasses.replace(base, workdir=os.path.join(out, "run"))
    folder = os.path.join(cfg.workdir, "trajectory")
    result = common.train_once(cfg, hooks=[TrajectoryHook(folder, every)])
    if result["status"] != "finished":
        raise common.ExperimentError(
            f"the training run is {result['status']}: nothing to draw "
            f"(see {cfg.workdir}/metrics.jsonl)"
        )
    surface, path, explained = analyse(cfg, folder, grid, surface_size)
    title = (
        f"{cfg.update_rule.upper()} {cfg.network} {cfg.n_hl}x{cfg.hl_size} on {cfg.dataset}, "
        f"lr {cfg.lr:g}, {cfg.num_epochs} epochs"
    )
    common.write_json(
        os.path.join(out, "landscape.json"),
        {"explained_variance": [float(e) for e in explained], "snapshots": len(path)},
    )
    return [
        common.write_csv(os.path.join(out, "landscape.csv"), surface),
        common.write_csv(os.path.join(out, "landscape_trajectory.csv"), path),
        plot(surface, path, explained, os.path.join(out, "landscape.png"), title),
    ]


def _main():
    return run(
        common.base_config("landscape"),
        common.out_dir("landscape"),
        FLAGS.every,
        FLAGS.grid,
        FLAGS.surface_size,
    )


main = common.command(_main)
