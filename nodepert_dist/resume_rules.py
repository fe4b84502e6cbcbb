"""What a resumed run may do with each setting whose value differs from its checkpoint's: the one
table of these rules (docs/design/checkpoints.md, Resuming with other settings), one row per
setting; resume.settle_resume applies them, and a test checks every setting has its row.
Re-exported as config.RESUME_RULES. Standard library only."""

from __future__ import annotations

# What a resumed run may do with a setting whose value differs from the checkpoint's. The one
# table of these rules (docs/design/checkpoints.md, Resuming with other settings); one row each.
RESUME_RULES = {
    # Allowed silently: where and how the run executes and what it writes, not what it computes
    # (np_mode and np_microbatches give the same update).
    "free": (
        "data_dir",
        "data_workers",
        "data_on_device",
        "num_epochs",
        "max_steps",
        "metrics_every",
        "steps_per_call",
        "hang_timeout_s",
        # where a population's members are placed; restore reshards the stacked state
        "member_devices",
        "crash_guard",
        "crash_points",
        "crash_lr_factor",
        "crash_max_rollbacks",
        "np_mode",
        "np_microbatches",
        "eval_batchsize",
        "eval_train",
        "workdir",
        "checkpoint_every_steps",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "keep_checkpoint_every_steps",
        "resume",
        "save_final_params",
        "preemption_check_steps",
    ),
    # Allowed, logged: training continues from the checkpoint under the new value. Optimizer
    # parts the checkpoint lacks (--optimizer, --clip_norm, --wd, --weight_norm) start fresh
    # (Adam's moments at 0, weight norms held at their values at the resume); parts this run
    # lacks are dropped. lr settings apply from the resume step (the lr jump is logged).
    "warn": (
        "preprocess",
        "dtype",
        "precision",
        "update_rule",
        "lr",
        "wd",
        "optimizer",
        "lr_schedule",
        "warmup_epochs",
        "lr_decay_epochs",
        "lr_decay_factor",
        "clip_norm",
        "weight_norm",
        "loss",
        "sigma",
        "noise",
        "np_antithetic",
        "np_draws",
        "np_delta",
        "np_layerwise",
        "np_estimator",
        "decorrelate_lr",
    ),
    # Allowed (logged) at an epoch boundary; refused mid-epoch: they choose the epoch's batches
    # (order, crops and flips), so the rest of the epoch would repeat and skip examples.
    "epoch": ("seed", "augment"),
    # Refused: the train state's arrays (np_local's heads, decorrelate's matrices, the
    # population's member axis) or the position in the data depend on them.
    "refuse": (
        "dataset",
        "validation_size",
        "cifar100_labels",
        "batchsize",
        "network",
        "n_hl",
        "hl_size",
        "width",
        "norm",
        "np_local",
        "decorrelate",
        "population",
    ),
    # Not given (0): the checkpoint's value is kept, so --num_epochs never moves the cosine
    # schedule; given: as "warn".
    "inherit": ("lr_schedule_epochs",),
}
RESUME_RULE = {name: rule for rule, names in RESUME_RULES.items() for name in names}
# resume.settle_resume applies them.
