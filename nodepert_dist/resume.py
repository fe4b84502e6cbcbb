"""Resuming under changed settings: config.RESUME_RULES applied to a checkpoint, and its
optimizer state carried onto this run's optimizer part by part.

`settle` runs first, before any data is read or anything compiles: it refuses a change the
table refuses (one line naming the flag) and fills the "inherit" settings from the newest
checkpoint. `restore` reads the checkpoint with the optimizer the checkpoint was saved with
(its recorded settings say which parts it had), then keeps the state of every part this run
shares with it and starts this run's other parts fresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from absl import logging

from nodepert_dist import agree, checkpoint_layout, checkpoint_restore, optim
from nodepert_dist import config as config_lib
from nodepert_dist import mesh as mesh_lib
from nodepert_dist import step as step_lib
from nodepert_dist.config import Config
from nodepert_dist.params_io import leaf_name

LR_SETTINGS = (
    "lr",
    "lr_schedule",
    "lr_schedule_epochs",
    "warmup_epochs",
    "lr_decay_epochs",
    "lr_decay_factor",
)


def _saved_value(saved: dict, name: str):
    """A setting as the checkpoint recorded it; its default if it predates the setting."""
    return saved[name] if name in saved else Config.__dataclass_fields__[name].default


def settle_resume(
    cfg: Config, saved: dict | None, mid_epoch: bool = False
) -> tuple[Config, list[str]]:
    """The run's settings against the checkpoint's (`saved`, its config; None: a fresh start).

    Returns the settings to run with ("inherit" rows filled in: from `saved`, or on a fresh
    start the cosine horizon from --num_epochs) and one line per changed "warn"/"epoch"
    setting; raises a one-line ValueError naming the flag for a refused change."""
    horizon = cfg.lr_schedule_epochs
    if cfg.lr_schedule == "cosine" and not horizon:
        if saved is not None and _saved_value(saved, "lr_schedule") == "cosine":
            # checkpoints older than the setting ran cosine over their --num_epochs
            horizon = _saved_value(saved, "lr_schedule_epochs") or saved["num_epochs"]
        else:
            horizon = cfg.num_epochs
    cfg = dataclasses.replace(cfg, lr_schedule_epochs=horizon)
    cfg.validate()
    if saved is None:
        return cfg, []
    changed = []
    for f in dataclasses.fields(Config):
        name, value = f.name, getattr(cfg, f.name)
        before, rule = _saved_value(saved, name), config_lib.RESUME_RULE[f.name]
        if value == before or rule == "free":
            continue
        if rule == "refuse":
            raise ValueError(
                f"the checkpoint was saved with --{name}={before}, this run has "
                f"--{name}={value}: a resumed run needs the same value; use "
                f"--{name}={before} or another --workdir"
            )
        if rule == "epoch" and mid_epoch:
            raise ValueError(
                f"the checkpoint stopped mid-epoch under --{name}={before}, this run "
                f"has --{name}={value}, which changes the rest of the epoch's batches "
                f"(examples repeated or skipped); resume with --{name}={before} and "
                f"change it at an epoch boundary"
            )
        changed.append(f"--{name}: {before} -> {value}")
    return cfg, changed


def _mid_epoch(manifest: dict) -> bool:
    return bool(manifest.get("loop", {}).get("step_in_epoch"))


def _newest_manifest(ckpt_dir: str) -> dict | None:
    """The newest committed checkpoint's manifest that reads on every process (process 0's
    listing decides, as in restore); None if there is none."""
    candidates = (
        list(reversed(checkpoint_layout.committed_steps(ckpt_dir)))
        if jax.process_index() == 0
        else []
    )
    while True:
        step = agree.from_process_0(candidates.pop(0) if candidates else -1)
        if step < 0:
            return None
        try:
            manifest = checkpoint_layout.read_manifest(checkpoint_layout.step_dir(ckpt_dir, step))
        except checkpoint_layout.CorruptCheckpoint:
            manifest = None  # restore sets it aside and falls back, as here
        if agree.everywhere(manifest is not None):
            return manifest


def settle(ckpt_dir: str, cfg: Config) -> Config:
    """This run's settings against the newest checkpoint's, before any work: refusals raise a
    one-line ValueError; "inherit" settings (the cosine horizon) are filled in."""
    manifest = _newest_manifest(ckpt_dir) if cfg.resume else None
    saved = manifest["config"] if manifest is not None else None
    cfg, _ = settle_resume(cfg, saved, manifest is not None and _mid_epoch(manifest))
    return cfg


def saved_config(saved: dict) -> Config:
    """The checkpoint's settings as a Config (settings it predates take their defaults)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})


def _part_names(cfg: Config) -> list[str]:
    return [name for name, _ in optim.parts_from(cfg.optim)]


def _lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    rate = optim.schedule_from(cfg.optim, cfg.num_epochs, steps_per_epoch)
    return float(rate(step)) if callable(rate) else float(rate)


def restore(
    ckpt_dir: str, cfg: Config, fresh: step_lib.TrainState, optimizer, mesh, steps_per_epoch: int
) -> tuple[Any, dict] | None:
    """(state, manifest) from the newest valid checkpoint, on this run's optimizer; None if
    there is none. `fresh`: this run's initial state (its parameters give the shapes)."""
    replicated = mesh_lib.replicated(mesh)
    legacy = []  # whether the restored checkpoint kept a schedule counter (see _saved_parts)

    def target(manifest: dict):  # the state as it was saved, for checkpoint_restore.load
        settle_resume(cfg, manifest["config"], _mid_epoch(manifest))  # refusals
        if cfg.population:  # the same population (refused otherwise): its stacked state as is
            if _part_names(saved_config(manifest["config"])) != _part_names(cfg):
                raise ValueError(
                    "a --population run resumes with the optimizer parts it was saved with "
                    "(--optimizer, --clip_norm, --wd, --weight_norm); use the saved values "
                    "or another --workdir"
                )
            return fresh
        parts, legacy[:] = _saved_parts(manifest, fresh.params)
        transform = optax.chain(*[t for _, t in parts]) if len(parts) > 1 else parts[0][1]
        opt_state = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            jax.eval_shape(transform.init, fresh.params),
        )
        return fresh.replace(opt_state=opt_state)

    try:
        restored = checkpoint_restore.restore(ckpt_dir, target)
    except checkpoint_layout.CheckpointError as e:  # arrays that do not match the recorded settings
        if isinstance(e, checkpoint_layout.CorruptCheckpoint):
            raise
        logging.error("%s", e)
        raise ValueError(
            f"the newest checkpoint in {ckpt_dir} does not match the settings it "
            f"recorded (written by another version of nodepert_dist?); resume it "
            f"with that version, or use another --workdir"
        ) from None
    if restored is None:
        return None
    state, manifest = restored
    saved = saved_config(manifest["config"])
    _, changed = settle_resume(cfg, manifest["config"], _mid_epoch(manifest))
    if changed:
        logging.warning("resuming with changed settings: %s", ", ".join(changed))
    step = int(mesh_lib.to_host(state.step).reshape(-1)[0])  # a population's: one
    if any(getattr(saved, k) != getattr(cfg, k) for k in LR_SETTINGS):
        logging.warning(
            "the lr at step %d changes from %g to %g (the lr settings changed)",
            step,
            _lr_at(saved, step, steps_per_epoch),
            _lr_at(cfg, step, steps_per_epoch),
        )
    if cfg.population:
        return state, manifest
    before, now = _part_names(saved), _part_names(cfg)
    kept = optim.part_states(before, state.opt_state)
    if legacy:  # the counter equals the step, which the schedule now reads instead
        kept[saved.optimizer] = (kept[saved.optimizer][0], optax.ScaleState())
    if before != now:
        initial = optim.part_states(
            now, jax.jit(optimizer.init, out_shardings=replicated)(state.params)
        )
        logging.warning(
            "optimizer parts: kept %s; started fresh %s; dropped %s",
            [n for n in now if n in before] or "none",
            [n for n in now if n not in before] or "none",
            [n for n in before if n not in now] or "none",
        )
        kept = {n: kept.get(n, initial[n]) for n in now}
    state = state.replace(opt_state=optim.join_part_states(now, kept))
    return state, manifest


def _saved_parts(manifest: dict, params) -> tuple[list, list]:
    """The optimizer parts a checkpoint was saved with, from its recorded settings, and [True]
    if it is of a version whose sgd/adam kept optax's schedule counter (an array `...count`
    beside a non-constant lr), else []."""
    saved = saved_config(manifest["config"])
    parts = optim.parts_from(saved.optim)
    transform = optax.chain(*[t for _, t in parts]) if len(parts) > 1 else parts[0][1]
    expected = {
        "opt_state." + leaf_name(p) if p else "opt_state"
        for p, _ in jax.tree_util.tree_flatten_with_path(jax.eval_shape(transform.init, params))[0]
    }
    stored = {a["name"] for a in manifest["arrays"] if a["name"].startswith("opt_state")}
    if stored == expected or (saved.lr_schedule == "constant" and not saved.warmup_epochs):
        return parts, []
    scheduled = {"sgd": optax.sgd, "adam": optax.adam}[saved.optimizer](
        optax.constant_schedule(1.0)
    )  # the structure only: optax's counter and all
    return [(n, scheduled if n == saved.optimizer else t) for n, t in parts], [True]
