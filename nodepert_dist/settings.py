"""How a setting is declared: `setting(default, help, group=..., choices=...)`, a dataclass field.

A leaf module (imports nothing from the package): each settings group (DataSettings in
data/pipeline.py, ModelSettings in models.py, OptimSettings in optim.py, NPSettings in
perturbation.py, ...) declares its fields with it next to the code it configures, and
config.Config joins the groups into the one flat settings object of a run.
"""

from __future__ import annotations

import dataclasses

# The `--help` groups, in the order they are printed.
GROUPS = (
    "settings",
    "data",
    "model",
    "training",
    "node perturbation",
    "evaluation",
    "outputs and checkpoints",
    "machine",
    "cluster",
)


def setting(default, help: str, *, group: str, choices=None):
    """A settings field; what a resumed run may do with it is in config.RESUME_RULES."""
    assert group in GROUPS
    return dataclasses.field(
        default=default,
        metadata=dict(help=help, group=group, choices=None if choices is None else tuple(choices)),
    )


def check_choices(group) -> None:
    """One-line error for a field of `group` whose value is not one of its choices."""
    for f in dataclasses.fields(group):
        allowed = f.metadata["choices"]
        if allowed is not None and getattr(group, f.name) not in allowed:
            raise ValueError(
                f"--{f.name}={getattr(group, f.name)!r} is not one of {', '.join(allowed)}"
            )


def check_positive(group, *names: str) -> None:
    for name in names:
        if not getattr(group, name) > 0:
            raise ValueError(f"--{name}={getattr(group, name)} must be positive")


def check_non_negative(group, *names: str) -> None:
    for name in names:
        if getattr(group, name) < 0:
            raise ValueError(f"--{name}={getattr(group, name)} must be >= 0")


def project(settings, group_cls):
    """The `group_cls` part of a flat settings object (its fields, same values)."""
    return group_cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(group_cls)})


def default(group_cls, name: str):
    return group_cls.__dataclass_fields__[name].default
