"""`nodepert-train`: node perturbation (or SGD) on a device mesh, epoch by epoch.

Sections: mesh -> the run (run_setup.build: data, model, state, steps) -> resume -> the loop.
Every process runs this same program; process 0 alone writes files and prints progress.
The settings (`Config`, one declaration each, and the flags made from them) are in config.py.
Checkpoints (nodepert_dist/checkpoint.py) go to <workdir>/checkpoints; a run resumes from the
newest one exactly: same data order, noise keys, optimizer state and metric rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging as pylogging
import os
import sys
import time
import types
import warnings

import jax
import numpy as np
from absl import app, logging

from nodepert_dist import (
    agree,
    checkpoint,
    checkpoint_layout,
    crash_guard,
    decorrelation,
    device_data,
    distributed,
    hang_watchdog,
    loop_metrics,
    metrics,
    params_io,
    population,
    preempt,
    resume,
    run_setup,
    workdir_lock,
)
from nodepert_dist import config as config_lib
from nodepert_dist import mesh as mesh_lib
from nodepert_dist.config import Config
from nodepert_dist.data import pipeline, raw

NAN = float("nan")

# Buffer donation is a no-op on CPU; the train step donates its state for GPU memory.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# ----------------------------------------------------------------------------- helpers

def _notify(hooks, event: str, *args) -> None:
    """Calls `hook.<event>(*args)` on the hooks that define it (experiments, crash guard):
    start(ctx), after_step(step, state, x, labels, step_metrics), after_row(row, rows).
    after_step's x is the uint8 global batch (ctx.run.prep(x): the float32 one the step saw)."""
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(*args)


def evaluate(eval_step, params, batches, mesh, decor=None) -> tuple[float, float]:
    """(accuracy, mean loss) over a whole split (`pipeline.eval_batches`), on the global batch
    (uint8: `eval_step` preprocesses); float64 arrays, one entry per member of a population (0-d
    for a solo run)."""
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}

    def add(out):  # host-side sums; waits for that batch (one in flight, as in the train loop)
        for k, v in mesh_lib.to_host(out).items():
            totals[k] = totals[k] + np.asarray(v, np.float64)

    pending = None
    for batch in pipeline.iterate(batches):
        x, y, mask = mesh_lib.global_batch(mesh, *batch)
        out = eval_step(params, x, y, mask, decor)
        if pending is not None:
            add(pending)
        pending = out
    add(pending)
    return totals["correct"] / totals["count"], totals["loss_sum"] / totals["count"]


def _step_of(state) -> int:
    """The state's update count (a population's members share it)."""
    return int(mesh_lib.to_host(state.step).reshape(-1)[0])


# ----------------------------------------------------------------------------- main loop

def train(cfg: Config) -> list[dict]:
    """Runs the whole training; returns the per-epoch metric rows (also written to the workdir)."""
    return run(cfg)[0]


def run(cfg: Config, hooks=()) -> tuple[list[dict], str]:
    """`train`, plus a line saying why the run ended early or did nothing ("" if it finished).

    `hooks`: objects told about the run (see `_notify`); none costs nothing per step."""
    cfg.validate()
    cfg = cfg.resolved()
    if cfg.steps_per_call > 1 and any(hasattr(h, "after_step") for h in hooks):
        raise ValueError(f"--steps_per_call={cfg.steps_per_call}: this measurement looks at "
                         f"every step; use --steps_per_call=1")
    if cfg.update_rule == "np" and cfg.np_estimator == "original":
        logging.warning("--np_estimator=original: the original code's BIASED estimator (one "
                        "noise draw per batch, batch-mean loss change), a reference to compare "
                        "against; the default per_example estimator is unbiased")

    # Mesh: `data` x `member` (--member_devices) over every device of every process.
    mesh = mesh_lib.make_mesh(member_devices=population.placement(cfg))
    run_setup.check_mesh(cfg, mesh)
    logging.info("mesh: %d devices over %d processes (%s)", mesh.devices.size,
                 jax.process_count(), jax.devices()[0].platform)
    # SIGTERM/SIGUSR1 from here on stop the run at a step boundary with a checkpoint.
    # ExitStack: the input pipeline's workers are stopped whichever way the run ends.
    with preempt.Watcher(cfg.preemption_check_steps) as watcher, \
            workdir_lock.hold(cfg.workdir), contextlib.ExitStack() as cleanup:
        return _run_locked(cfg, mesh, watcher, hooks, cleanup)


def _run_locked(cfg: Config, mesh, watcher: preempt.Watcher, hooks,
                cleanup: contextlib.ExitStack) -> tuple[list[dict], str]:
    # A resumed run's settings against its checkpoint's (config.RESUME_RULES), before any work.
    ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
    cfg = resume.settle(ckpt_dir, cfg)
    # The run: data (memory-mapped uint8 arrays, store.py; each process gathers only its
    # share, preprocessed per batch on the device), model, optimizer, state, steps.
    built = run_setup.build(cfg, mesh)
    data, splits, n_steps = built.data, built.splits, built.steps_per_epoch
    model, optimizer, state = built.model, built.optimizer, built.state
    members = population.members(cfg)  # [{}]: a solo run
    loop, eval_step, eval_batch = built.loop, built.eval_step, built.eval_batch
    on_device = cfg.data_on_device and device_data.DeviceData(mesh, data.train_x, data.train_y)
    dog = cleanup.enter_context(hang_watchdog.StepWatchdog(  # armed by the first read (below)
        cfg.hang_timeout_s, f"process {jax.process_index()}/{jax.process_count()}"))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)) // len(members)
    logging.info("%s: %d parameters, sigma=%g, %d steps/epoch of %d examples",
                 cfg.network, n_params, cfg.sigma, n_steps, cfg.batchsize)
    if cfg.lr_schedule == "cosine":
        logging.info("lr: cosine from %g to 0 over %d epochs (--lr_schedule_epochs; kept on "
                     "resume whatever --num_epochs says)", cfg.lr, cfg.lr_schedule_epochs)
    # Evaluation pads its last batch anyway: any batch works once it splits over the devices.
    if eval_batch != cfg.eval_batchsize:
        logging.info("--eval_batchsize=%d rounded up to %d, a multiple of the %d data devices",
                     cfg.eval_batchsize, eval_batch, mesh_lib.data_size(mesh))

    def eval_split(images, labels, rows=None):
        return evaluate(eval_step, state.params, pipeline.eval_batches(
            images, labels, global_batch=eval_batch, process_index=jax.process_index(),
            process_count=jax.process_count(), rows=rows), mesh, state.decor)

    def epoch_row(epoch: int, extra: dict) -> list[dict]:
        """The epoch's rows: one, or one per population member (its index and settings)."""
        values = dict(zip(("test_acc", "test_loss"), eval_split(data.test_x, data.test_y)))
        if cfg.validation_size:
            values["val_acc"], values["val_loss"] = eval_split(data.train_x, data.train_y,
                                                               splits["val"])
        if cfg.eval_train:
            values["train_acc"], values["train_loss"] = eval_split(data.train_x, data.train_y,
                                                                   splits["train"])
        values.update(extra)
        return [writer.write({"epoch": epoch, "step": _step_of(state),
                              **({"member": i, **member} if cfg.population else {}),
                              **{k: population.pick(v, i) for k, v in values.items()}})
                for i, member in enumerate(members)]  # NaN/Inf (an overflowing loss) as null

    # Resume from the newest valid checkpoint, or start with epoch 0 (the untrained network).
    restored = (resume.restore(ckpt_dir, cfg, state, optimizer, mesh, n_steps) if cfg.resume
                else None)
    # Process 0's listing decides (like restore's): stale caches must not split the processes.
    if restored is None and cfg.checkpointing and agree.from_process_0(
            len(checkpoint_layout.committed_steps(ckpt_dir))):
        raise ValueError(f"--noresume, but {ckpt_dir} holds checkpoints of an earlier run; "
                         f"remove them or use another --workdir")
    if restored is not None:
        state, manifest = restored
        position = manifest["loop"]
        saved_order = manifest.get("rng", {}).get("data_order")
        if position["step_in_epoch"] and saved_order != pipeline.DATA_ORDER:
            raise ValueError(
                f"the checkpoint in {ckpt_dir} stopped mid-epoch under another data order "
                f"({saved_order!r}); resuming would repeat or skip examples. Resume it with the "
                f"version that saved it, or remove checkpoints back to an epoch boundary")
    # After every refusal (config.json stays the last run's). A fresh start never appends to an
    # earlier run's metrics: they are moved aside (kept).
    writer = metrics.MetricsWriter(cfg.workdir, dict(
        dataclasses.asdict(cfg), preprocess_resolved=built.prep_mode,
        machine=mesh_lib.machine(mesh), data={k: data.meta.get(k) for k in (
            "source", "verified", "checksum_problem")}), fresh=restored is None)
    if restored is not None:
        rows, epoch_start, step_start = position["rows"], position["epoch"], position["step_in_epoch"]
        # The running sums of the interrupted epoch (host floats: JSON keeps them exactly).
        resumed_sums = position["sums"]
        resumed_elapsed = position["elapsed"]
        writer.truncate_after(epoch_start - 1)
        logging.info("resumed from %s at epoch %d, step %d of the epoch (step %d in all)",
                     ckpt_dir, epoch_start, step_start, manifest["step"])
    else:
        rows, epoch_start, step_start = epoch_row(0, {}), 1, 0
        resumed_sums, resumed_elapsed = None, 0.0
    # Pruning keeps the crash guard's rollback target: the checkpoint of the last epoch row.
    saver = (checkpoint.Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints,
                                     keep_every_steps=cfg.keep_checkpoint_every_steps,
                                     rollback_step=rows[-1]["step"])
             if cfg.checkpointing else None)
    step = _step_of(state)
    watch = population.Watch(cfg, state) if cfg.population else None
    _notify(hooks, "start", types.SimpleNamespace(
        cfg=cfg, run=built, model=model, mesh=mesh, data=data, splits=splits,
        prep_mode=built.prep_mode, step=step, rows=rows, steps_per_epoch=n_steps, state=state))

    def save(epoch: int, step_in_epoch: int, sums, elapsed: float) -> None:
        """The loop's whole position: resuming runs from batch `step_in_epoch` of `epoch`."""
        position = {"epoch": epoch, "step_in_epoch": step_in_epoch,
                    "process_index": jax.process_index(), "process_count": jax.process_count()}
        saver.save(step, state, position=position, meta={
            "epoch": epoch, "config": dataclasses.asdict(cfg),
            "rng": {"seed": cfg.seed,
                    "noise_keys": "fold_in(fold_in(seed, noise tag), step, example index)",
                    "data_order": pipeline.DATA_ORDER},
            "loop": {"epoch": epoch, "step_in_epoch": step_in_epoch, "sums": sums and {
                         k: np.asarray(v).tolist() for k, v in sums.items()},  # floats, or lists
                     "elapsed": elapsed, "rows": list(rows)}})

    def read(sums, epoch: int, through: int, log) -> None:  # the device's metric log
        try:
            reader.read(sums, log, through, epoch)
        except ValueError:
            if saver:  # finish the save in flight (a finite state): exiting mid-write aborts
                saver.wait()
            raise

    def call_size(done: int) -> int:
        """K steps, or fewer where an epoch end, --max_steps or step checkpoint falls inside."""
        room = [n_steps - done]
        if cfg.max_steps:
            room.append(cfg.max_steps - step)
        if saver and cfg.checkpoint_every_steps:
            room.append(cfg.checkpoint_every_steps - step % cfg.checkpoint_every_steps)
        return loop.call_size(min(room), n_steps)

    def save_due(step: int) -> bool:
        return bool(saver and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)

    def stop_due(step: int) -> bool:
        return bool(cfg.max_steps and step >= cfg.max_steps)

    # Train loop.
    preempted = False
    for epoch in range(epoch_start, cfg.num_epochs + 1):
        if stop_due(step):
            break
        # the epoch's order is one permutation (~3 ms for MNIST), made once: by the pipeline or
        # for the devices (--data_on_device), whose epoch of 16-step calls takes ~16 ms on a GPU
        batches = None if on_device else pipeline.train_batches(
            data.train_x, data.train_y, global_batch=cfg.batchsize, seed=cfg.seed, epoch=epoch,
            process_index=jax.process_index(), process_count=jax.process_count(),
            rows=splits["train"], augment=cfg.augment)
        order = on_device and on_device.epoch_order(seed=cfg.seed, epoch=epoch, rows=splits[
            "train"], global_batch=cfg.batchsize, ahead=epoch < cfg.num_epochs)
        progress = metrics.Progress(epoch, n_steps, cfg.batchsize)
        first = step_start if epoch == epoch_start else 0
        sums = ({k: np.asarray(v, np.float64) for k, v in resumed_sums.items()} if first else
                {"loss_sum": 0.0, "correct": 0.0, "last_loss": NAN})
        start = time.perf_counter() - (resumed_elapsed if first else 0.0)
        done, in_flight, log = first, None, loop.new_log()
        reader = loop_metrics.Reader(cfg.metrics_every, step, watch, dog)
        stream = on_device or cleanup.enter_context(contextlib.closing(
            pipeline.iterate(batches, start=first, workers=cfg.data_workers)))
        while done < n_steps:
            k = call_size(done)
            previous = log  # not donated: read after this call is dispatched
            if on_device:  # the batches gathered inside the call (device_data.py)
                state, log, m, x, y = loop.call_on_device(state, log, on_device, order, done, k)
            else:
                x, y = (mesh_lib.global_batch(mesh, *next(stream)) if k == 1 else
                        mesh_lib.global_batch(mesh, *map(np.stack, zip(*itertools.islice(
                            stream, k))), stacked=True))
                state, log, m = loop.call(state, log, x, y)
            since, step, done = step, step + k, done + k
            _notify(hooks, "after_step", step, state, x, y, m)
            # At most one call in flight: dispatch call i, then wait for call i-1 (a tiny
            # output; nothing is copied), or read its log. A deeper queue buys nothing here and,
            # with simulated CPU devices, can deadlock XLA's host thread pool in a collective
            # rendezvous.
            if reader.due(since):
                read(sums, epoch, since, previous)
            elif in_flight is not None:
                jax.block_until_ready(in_flight)
            in_flight = m["count"]
            if done == n_steps:  # the epoch's end (and the progress line's loss)
                read(sums, epoch, step, log)
            progress.update(done, lambda: np.mean(sums["last_loss"]))  # noqa: B023 (read now)
            preempted = watcher.stop_now(step, since)  # agreed by every process
            stopping = stop_due(step) or preempted
            if done < n_steps and (save_due(step) or (saver and stopping)):
                read(sums, epoch, step, log)
                save(epoch, done, sums, time.perf_counter() - start)
            if stopping:
                break
        if not on_device:
            stream.close()  # stops the prefetch (and the workers) now, not at exit
        read(sums, epoch, step, log)
        if done < n_steps:  # stopped inside the epoch (--max_steps, a signal): no row for it
            break
        epoch_time = time.perf_counter() - start
        mean_loss = sums["loss_sum"] / (n_steps * cfg.batchsize)
        new_rows = epoch_row(epoch, {
            "epoch_time": epoch_time, "mean_step_loss": mean_loss,
            "step_train_acc": sums["correct"] / (n_steps * cfg.batchsize),
            "examples_per_s": n_steps * cfg.batchsize / epoch_time})
        rows.extend(new_rows)
        try:  # before this epoch's checkpoint: the crash guard may stop the run here
            for i in range(len(new_rows)):
                _notify(hooks, "after_row", new_rows[i], rows[:len(rows) - len(new_rows) + i + 1])
        except Exception:
            if saver:  # an earlier save may be in flight: finish it before anything moves it
                saver.wait()
            raise
        if watch is not None:  # --crash_guard: members that crashed this epoch are frozen
            state = watch.after_epoch(state, rows)
        if saver and (save_due(step) or stop_due(step) or preempted or epoch == cfg.num_epochs
                      or (cfg.checkpoint_every_epochs and epoch % cfg.checkpoint_every_epochs == 0)):
            save(epoch + 1, 0, None, 0.0)
        if saver:  # this epoch's row passed the hooks (the crash guard): the new rollback target
            saver.rollback_step = step
        if preempted:
            break
    if saver:
        saver.wait()
    if preempted:
        raise preempt.Preempted(
            f"preempted by {watcher.describe()} at step {step}: "
            + ("checkpoint saved; run the same command again to resume" if saver else
               "no checkpoint (checkpointing is off)") + f" (exit {preempt.EXIT_CODE})")
    if cfg.save_final_params:
        params_io.save_npz(cfg.save_final_params, state.params if state.decor is None else
                           {**state.params, decorrelation.DECOR: state.decor})  # R too
    note = ""  # said at the end: otherwise the last line printed is an earlier epoch's row
    if restored is not None and epoch_start > cfg.num_epochs:
        more = "raise --num_epochs to train on"
        if cfg.lr_schedule == "cosine":  # its length is recorded; --num_epochs never moves it
            more = (f"raise --num_epochs, up to {cfg.lr_schedule_epochs}, to train on along the "
                    f"same cosine" if cfg.num_epochs < cfg.lr_schedule_epochs else
                    f"the cosine lr reached 0 at epoch {cfg.lr_schedule_epochs}: raise "
                    f"--num_epochs and --lr_schedule_epochs together to train on (the cosine is "
                    f"then recomputed over the new length from here)")
        note = (f"already finished: {cfg.num_epochs} epochs done (step {step}); nothing to do "
                f"({more})")
    elif rows[-1]["epoch"] < cfg.num_epochs and stop_due(step):
        note = (f"stopped at --max_steps={cfg.max_steps} (step {step}, {rows[-1]['epoch']} of "
                f"{cfg.num_epochs} epochs done); rerun with a larger --max_steps to continue")
    if note:
        logging.info("%s", note)
    return rows, note


# ----------------------------------------------------------------------------- CLI

def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    flags_ = config_lib.FLAGS
    # jax logs each backend it cannot start ('tpu'...); distributed.initialize logs those used
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.ERROR)
    if flags_.xla_cpu_conv_flag:  # before the CPU backend starts
        mesh_lib.tune_cpu_convolutions()
    mesh_lib.reproducible_compilation(flags_.deterministic, flags_.compilation_cache_dir)
    if flags_.cpu_devices > 0:  # before jax.distributed and before any device use
        mesh_lib.simulate_cpu_devices(flags_.cpu_devices)
    try:
        cfg = config_lib.from_flags()
        # Multi-process start-up (flags, NODEPERT_* env, cluster detection, or one process).
        distributed.initialize_from_flags()
        rows, note = crash_guard.run(run, cfg) if cfg.crash_guard else run(cfg)
    except preempt.Preempted as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(preempt.EXIT_CODE) from None
    except (ValueError, OSError, raw.DataError, distributed.DistributedError) as e:  # OSError:
        # e.g. a read-only or full workdir; checkpoint_layout.CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if metrics.is_writer():
        for row in rows[-len(population.members(cfg)):]:  # the last epoch's (each member's)
            print(json.dumps(row))
        if note:
            print(note)


def cli():
    app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    cli()
