"""crash-timing: when does NP training crash, over an lr grid? Then replay a crash step by step.

    python -m nodepert_dist.experiments crash-timing --lrs=0.004,0.007,0.01,0.02 --num_epochs=200
    python -m nodepert_dist.experiments crash-timing --as_population --replay_runs=0 --num_epochs=200

A crash is test accuracy more than --crash_points (default 25) points below the best so far.
Each run trains under the crash guard with no rollback allowed, so it stops at its first crash
(or non-finite loss), and its newest checkpoint is the last one before the crash. Reference
(the original code's figure): fc 3x500 on MNIST did not crash for lr <~ 0.004, and the crash
epoch fell from ~200 to 0 as lr went from 0.004 to 0.02.

Replay (--replay_runs, the crashing runs with the lowest lrs): the crash epoch is trained
again from that checkpoint (same data order and noise, so the same crash), logging at every
--replay_every steps the gradient statistics of grad-stats (of the estimator the run trains
with: every --np_* setting, --noise and --sigma) plus weight and activity norms per layer. Writes crash_timing.csv/.png (crash epoch vs lr) and crash_replay.csv/.png.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from absl import flags

from nodepert_dist import checkpoint_layout, files, metrics
from nodepert_dist.experiments import common, probes

flags.DEFINE_integer("replay_runs", 1, "Replay this many crashed runs (lowest lrs first; 0: none).")
flags.DEFINE_integer("replay_every", 1, "During the replay, statistics every N steps.")
flags.DEFINE_integer(
    "replay_draws",
    4,
    "NP draws per replay measurement (each an estimate of "
    "the run's own estimator, --np_* settings included).",
)
flags.DEFINE_integer("probe_size", 256, "Training examples in the replay's probe batch.")
FLAGS = flags.FLAGS

DEFAULT_LRS = common.log_grid(0.002, 0.05, 6)


def timing(
    base, out, lrs, seeds, launch="inprocess", parallel=1, as_population=False
) -> tuple[list[dict], list[dict]]:
    """The timing rows of the lr x seed grid, run by run or (as_population) as one population,
    where a member's first crash or divergence freezes it (its member_crashed/_diverged event)."""
    guarded = dataclasses.replace(base, crash_guard=True, crash_max_rollbacks=0)
    runs = common.run_grid(
        guarded,
        {"lr": list(lrs)},
        seeds,
        os.path.join(out, "runs"),
        launch,
        parallel,
        as_population,
    )
    rows = []
    for run in runs:
        o, epochs = run["outcome"], run["outcome"]["rows"]
        crashed = o["status"] in ("crashed", "diverged")
        rows.append(
            {
                "lr": run["settings"]["lr"],
                "seed": run["settings"]["seed"],
                "status": o["status"],
                "crash_epoch": o.get("event_epoch") if crashed else None,
                "epochs_trained": epochs[-1]["epoch"] if epochs else 0,
                "best_acc": max((r["test_acc"] for r in epochs), default=None),
                "acc_after_crash": epochs[-1]["test_acc"]
                if crashed and o["status"] == "crashed"
                else None,
                "workdir": run["workdir"],
            }
        )
    return runs, rows


def plot_timing(rows, path, base) -> str:
    fig, axes = common.figure()
    ax = axes[0, 0]
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        hit = [r for r in mine if r["crash_epoch"] is not None]
        ax.plot(
            [r["lr"] for r in hit],
            [r["crash_epoch"] for r in hit],
            "o-",
            color=f"C{seed}",
            label=f"seed {seed}: crash epoch",
        )
        safe = [r for r in mine if r["status"] == "finished"]
        if safe:
            ax.plot(
                [r["lr"] for r in safe],
                [base.num_epochs] * len(safe),
                "^",
                color=f"C{seed}",
                label=f"seed {seed}: no crash in {base.num_epochs} epochs",
            )
        for r in mine:  # a run that never learned cannot crash by this rule: show how far it got
            if r["best_acc"] is not None:
                y = r["crash_epoch"] if r["crash_epoch"] is not None else base.num_epochs
                ax.annotate(
                    f"best {100 * r['best_acc']:.0f}%",
                    (r["lr"], y),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, -9),
                )
    common.log_axis(ax, ticks=sorted({r["lr"] for r in rows}))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("epoch of the first crash")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{base.update_rule.upper()} {base.network} {base.n_hl}x{base.hl_size} on "
        f"{base.dataset}; crash = test acc {base.crash_points:g} points below best",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return common.save_figure(fig, path)


def replay(run: dict, out: str, every: int, draws: int, probe_size: int) -> list[dict]:
    """Trains the crash epoch again from the last checkpoint before it, logging every step."""
    src_dir = os.path.join(run["workdir"], "checkpoints")
    steps = checkpoint_layout.committed_steps(src_dir)
    crash_epoch = run["outcome"]["event_epoch"]
    name = os.path.basename(run["workdir"])
    dest = os.path.join(out, "replay", name)
    if steps and metrics.is_writer() and not os.path.exists(os.path.join(dest, "checkpoints")):
        tmp = os.path.join(out, "replay", f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(
            checkpoint_layout.step_dir(src_dir, steps[-1]),
            os.path.join(
                tmp, "checkpoints", os.path.basename(checkpoint_layout.step_dir(src_dir, steps[-1]))
            ),
        )
        os.replace(tmp, dest)
    cfg = dataclasses.replace(
        run["cfg"],
        workdir=dest,
        crash_guard=False,
        num_epochs=crash_epoch,
        checkpoint_every_epochs=0,
        checkpoint_every_steps=0,
        max_steps=0,
    )
    jsonl = os.path.join(dest, "replay.jsonl")
    result = common.train_once(
        cfg, hooks=[probes.Hook(jsonl, every, draws, probe_size, norms=True, at_start=True)]
    )
    original = run["outcome"]["rows"][-1] if run["outcome"]["status"] == "crashed" else None
    again = result["rows"][-1] if result["rows"] else {}
    tag = {
        "lr": run["settings"]["lr"],
        "seed": run["settings"]["seed"],
        "crash_epoch": crash_epoch,
        "replay_status": result["status"],
        "replay_test_acc": again.get("test_acc"),
        "original_test_acc": original["test_acc"] if original else None,
    }
    return [{**tag, **r} for r in files.read_jsonl(jsonl)]


def plot_replay(rows, path) -> str:
    first = rows[0]
    fig, axes = common.figure(3, 2, size=(5.2, 3.0))
    steps = [r["step"] for r in rows]
    names = probes.layer_names(rows)
    colors = {
        "NP": "C3",
        "SGD": "C2",
        "true grad = 0 (whole)": "C7",
        **{n: f"C{i}" for i, n in enumerate(names)},
    }
    panels = [
        ("loss", "probe loss", [("", "loss")]),
        (
            "angle",
            "angle to true gradient (deg)",
            [("whole", "all_angle")] + [(n, f"{n}_angle") for n in names],
        ),
        ("norms", "gradient norm (whole)", [("NP", "all_norm_np"), ("SGD", "all_norm_sgd")]),
        (
            "sign",
            "sign symmetry; zero-gradient fraction",
            [("whole", "all_sign_sym")]
            + [(n, f"{n}_sign_sym") for n in names]
            + [("true grad = 0 (whole)", "all_zero_grad")],
        ),
        ("w", "weight norm", [(n, f"{n}_w_norm") for n in names]),
        ("act", "activity norm (mean per example)", [(n, f"{n}_act_norm") for n in names]),
    ]
    for ax, (kind, ylabel, series) in zip(axes.ravel(), panels):
        for label, key in series:  # one colour per layer in every panel
            color = colors.get(label, "k")
            ax.plot(
                steps,
                [r.get(key, float("nan")) for r in rows],
                color=color,
                lw=1,
                label=label or None,
            )
        if kind in ("norms", "w", "act", "loss"):
            common.log_axis(ax, "y")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=6)
    acc = (
        f"; test acc after the epoch: replay {100 * first['replay_test_acc']:.1f}%"
        if first["replay_test_acc"] is not None
        else ""
    )
    if first["original_test_acc"] is not None:
        acc += f", original {100 * first['original_test_acc']:.1f}%"
    fig.suptitle(
        f"replay of the crash epoch {first['crash_epoch']}, lr {first['lr']:g}, "
        f"seed {first['seed']}{acc}",
        fontsize=9,
    )
    return common.save_figure(fig, path)


def run(
    base,
    out,
    lrs,
    seeds,
    replay_runs=1,
    every=1,
    draws=4,
    probe_size=256,
    launch="inprocess",
    parallel=1,
    as_population=False,
) -> list[str]:
    runs, rows = timing(base, out, lrs, seeds, launch, parallel, as_population)
    paths = [
        common.write_csv(os.path.join(out, "crash_timing.csv"), rows),
        plot_timing(rows, os.path.join(out, "crash_timing.png"), base),
    ]
    crashed = sorted(
        (r for r in runs if r["outcome"]["status"] in ("crashed", "diverged")),
        key=lambda r: (r["settings"]["lr"], r["settings"]["seed"]),
    )
    replayed = []
    for r in crashed[:replay_runs]:
        replayed += replay(r, out, every, draws, probe_size)
    if replayed:
        paths.append(common.write_csv(os.path.join(out, "crash_replay.csv"), replayed))
        first = [
            r for r in replayed if (r["lr"], r["seed"]) == (replayed[0]["lr"], replayed[0]["seed"])
        ]
        paths.append(plot_replay(first, os.path.join(out, "crash_replay.png")))
    elif replay_runs:
        print("[crash-timing] no run crashed: nothing to replay")
    return paths


def _main():
    if FLAGS.replay_runs < 0 or FLAGS.replay_every <= 0 or FLAGS.replay_draws < 2:
        raise common.ExperimentError("--replay_runs >= 0, --replay_every > 0, --replay_draws >= 2")
    if common.FLAGS.as_population and FLAGS.replay_runs:
        raise common.ExperimentError(
            "--as_population keeps no per-run checkpoint to replay a crash from: add "
            "--replay_runs=0, or drop --as_population"
        )
    return run(
        common.base_config("crash-timing"),
        common.out_dir("crash-timing"),
        common.lrs(DEFAULT_LRS),
        FLAGS.seeds,
        FLAGS.replay_runs,
        FLAGS.replay_every,
        FLAGS.replay_draws,
        FLAGS.probe_size,
        FLAGS.launch,
        FLAGS.parallel,
        common.FLAGS.as_population,
    )


main = common.command(_main)
