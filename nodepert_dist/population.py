"""`--population`: members of one network trained side by side in one compiled step.

`--population='lr:0.01,0.02;seed:0,1'` is the grid lr x seed (4 members, in the grid's order:
later keys vary fastest, so member 1 is lr=0.01, seed=1). The members' train states are stacked
on a leading axis and the step maps one member's update over it inside the data-parallel
shard_map (step.make_train_step, step.over_members), so every member sees the same batches: a paired comparison. Members may
differ only in settings that keep the shapes and the program: `MEMBER_SETTINGS`. Each member's
values enter the step as traced scalars; the gradient and optimizer are built from the run's
settings with them replaced (`rule`), exactly as a solo run of those settings builds them
(a member's noise keys fold in its own seed), so member i's update is that solo run's on the
same batch.

Placement: on a mesh of member=M x data=D/M (--member_devices=M, mesh.make_mesh) the stacked
state, the members' values and their metrics are split over `member`: each device holds and
trains N/M members, on the batch slice of its data position. M=1 is the same program with every
member on every device; the default (0) takes the most groups the members and each process's
devices allow (`placement`), measured fastest (docs/results/population.md).

Member seeds choose parameter init and NP noise; the data order stays the run's --seed (the
shared stream). Independent data orders per member need separate runs (launch/sweep.py), one
job each.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nodepert_dist import crash_guard, metrics, optim
from nodepert_dist import step as step_lib
from nodepert_dist.mesh import MEMBER, to_host
from nodepert_dist.run_record import MEMBER_SETTINGS, by_member, epoch_rows

_SEED_LIMIT = 2**32  # member seeds are uint32 inside the step (jax.random.key takes them as is)


def parse(spec: str, fields: dict) -> list[tuple[str, list]]:
    """`KEY:V,V;KEY:V` -> [(key, [values])], values parsed by the setting's type. `fields`:
    {name: dataclasses.Field} of the run's settings. One-line ValueErrors."""
    grid, seen = [], set()
    for part in spec.split(";"):
        part = part.strip()
        key, sep, values = part.partition(":")
        key = key.strip()
        if not part or not sep or not key or not values.strip():
            raise ValueError(
                f"--population={spec!r}: expected KEY:V1,V2;KEY:V1,... (e.g. lr:0.01,0.02;seed:0,1)"
            )
        if key not in fields:
            raise ValueError(
                f"--population: unknown setting {key!r}; members may vary "
                f"{', '.join(MEMBER_SETTINGS)}"
            )
        if key not in MEMBER_SETTINGS:
            raise ValueError(
                f"--population: {key} cannot vary within a population (it changes the "
                f"network's shapes or the compiled program); members may vary "
                f"{', '.join(MEMBER_SETTINGS)}; run one job per {key} (launch/sweep.py)"
            )
        if key in seen:
            raise ValueError(f"--population: {key} is given twice; list its values once")
        seen.add(key)
        kind = int if key == "seed" else float
        parsed = []
        for v in values.split(","):
            try:
                parsed.append(kind(v.strip()))
            except ValueError:
                raise ValueError(
                    f"--population: {key}={v.strip()!r} is not a{'n integer' if kind is int else ' number'}"
                ) from None
        if key == "seed" and not all(0 <= s < _SEED_LIMIT for s in parsed):
            raise ValueError(f"--population: seeds must be in [0, 2**32); got {parsed}")
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"--population: {key} lists a value twice: {parsed}")
        grid.append((key, parsed))
    return grid


def members(cfg) -> list[dict]:
    """Each member's settings {key: value} in the grid's order (later keys vary fastest);
    [{}] (one member, the run itself) without --population."""
    if not cfg.population:
        return [{}]
    grid = parse(cfg.population, {f.name: f for f in dataclasses.fields(cfg)})
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]


def check(cfg) -> None:
    """One-line errors: the spec, and each member's settings (validated as a solo run of them
    would be)."""
    m = cfg.member_devices
    if not cfg.population:
        if m > 1:
            raise ValueError(
                f"--member_devices={m} spreads a --population's members over devices; this run "
                f"has no --population: drop --member_devices or give a population"
            )
        return
    n = len(members(cfg))
    if m and n % m:
        raise ValueError(
            f"--member_devices={m} does not divide the population's {n} members; use one of "
            f"{', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}"
        )
    for i, member in enumerate(members(cfg)):
        try:
            member_config(cfg, member).validate()
        except ValueError as e:
            raise ValueError(f"--population member {i} ({describe(member)}): {e}") from None


def member_config(cfg, member: dict):
    """The solo run's settings of one member."""
    return dataclasses.replace(cfg, population="", member_devices=0, **member)


def placement(cfg) -> int:
    """The member groups of the mesh (mesh.make_mesh): --member_devices, or for 0 (the default)
    the most that the members and this process's devices allow; 1 for a solo run."""
    if cfg.member_devices or not cfg.population:
        return cfg.member_devices or 1
    return math.gcd(len(members(cfg)), jax.local_device_count())


def describe(member: dict) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in member.items()
    )


def values(cfg) -> dict:
    """{key: array over members} of the varying settings: the step's traced scalars. Seeds are
    uint32; the rest take the dtype a Python float takes in jax (float32, float64 under x64),
    so lr * update is computed as in a solo run."""
    ms = members(cfg)
    real = jax.dtypes.canonicalize_dtype(np.float64)
    return {
        k: np.array([m[k] for m in ms], np.uint32 if k == "seed" else real)
        for k in (ms[0] if cfg.population else ())
    }


def rule(cfg, steps_per_epoch: int):
    """`f(overrides) -> (local gradient, optimizer)`: the run's update rule with `overrides`
    ({key: traced scalar} of one member, or {} for the run's own settings) in place.

    A population varying wd has the decay part in every member (wd=0 adds -0*w: the same
    update) and in `f({})`, the optimizer whose state the members stack."""
    decay = True if "wd" in members(cfg)[0] else None

    def build(overrides: dict):
        c = dataclasses.replace(cfg, **overrides)
        gradient = step_lib.local_gradient(
            update_rule=c.update_rule, loss=c.loss, seed=c.seed, global_batch=c.batchsize, np=c.np
        )
        return gradient, optim.optimizer_from(c.optim, c.num_epochs, steps_per_epoch, decay)

    return build


def init_state(cfg, model, optimizer, sample_x, mesh):
    """The initial state: the run's (solo), or each member's from its own seed, stacked on the
    host and split over the mesh's `member` axis (no device ever holds all members at once)."""
    if not cfg.population:
        return step_lib.init_state(model, optimizer, sample_x, cfg.seed, mesh)
    states = [
        jax.device_get(
            step_lib.init_state(model, optimizer, sample_x, m.get("seed", cfg.seed), mesh)
        )
        for m in members(cfg)
    ]
    stacked = jax.tree.map(lambda *a: np.stack(a), *states)
    stacked = stacked.replace(alive=np.ones(len(states), bool))
    return jax.device_put(stacked, NamedSharding(mesh, P(MEMBER)))


def pick(value, i: int) -> float:
    """Member i's entry of a per-member metric (one value shared by all: that value)."""
    flat = np.asarray(value).reshape(-1)
    return float(flat[i if flat.size > 1 else 0])


class Watch:
    """Per-member marks of a population run, on the host: the step freezes a member whose loss
    or state turns non-finite (`member_diverged` event row), and with --crash_guard a member
    whose test accuracy crashes (`crash_guard.is_crash`) is frozen after that epoch
    (`member_crashed`): no rollback, the others go on. The run stops (Diverged) only when
    every member has diverged."""

    def __init__(self, cfg, state):
        self.cfg, self.members = cfg, members(cfg)
        self.alive = np.array(to_host(state.alive), bool)  # a writable copy

    def _event(self, name: str, i: int, **detail) -> None:
        metrics.write_event(
            self.cfg.workdir, {"event": name, "member": i, **self.members[i], **detail}
        )

    def after_step(self, alive, loss, step: int, epoch: int) -> None:
        alive = np.asarray(alive, bool)
        for i in np.flatnonzero(self.alive & ~alive):
            self._event("member_diverged", int(i), step=step, epoch=epoch, loss=float(loss[i]))
        self.alive = self.alive & alive
        if not self.alive.any():
            raise crash_guard.Diverged(
                f"every member of --population diverged (the last at step {step}, epoch "
                f"{epoch}); use lower lrs"
            )

    def after_epoch(self, state, rows: list[dict]):
        """`state`, with the members whose latest epoch row crashed frozen (--crash_guard)."""
        if not self.cfg.crash_guard:
            return state
        crashed = []
        for i, member_rows in by_member(epoch_rows(rows)).items():
            *earlier, last = member_rows
            best = max((r["test_acc"] for r in earlier if r["test_acc"] is not None), default=None)
            acc = last["test_acc"] if last["test_acc"] is not None else float("nan")
            if (
                self.alive[i]
                and best is not None
                and crash_guard.is_crash(acc, best, self.cfg.crash_points)
            ):
                crashed.append(i)
                self._event(
                    "member_crashed",
                    i,
                    step=last["step"],
                    epoch=last["epoch"],
                    test_acc=acc,
                    best_test_acc=best,
                )
        if not crashed:
            return state
        self.alive[crashed] = False
        return state.replace(alive=jax.device_put(self.alive.copy(), state.alive.sharding))
