"""Per-example losses. Both return one scalar per example: NP needs per-example loss changes."""

import jax
import jax.numpy as jnp
import optax

LOSSES = ("mse", "ce")


def _wide(logits):
    # Loss differences stay float32 or wider even when the model is bf16 (docs/design/estimator.md).
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def mse(logits, labels):
    """The original code's loss: mean over classes of (sigmoid(logits) - one_hot)^2."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=_wide(logits).dtype)
    return jnp.mean(jnp.square(jax.nn.sigmoid(_wide(logits)) - targets), axis=-1)


def ce(logits, labels):
    """Softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(_wide(logits), labels)


def get(name):
    if name not in LOSSES:
        raise ValueError(f"unknown --loss={name!r}; choose one of {', '.join(LOSSES)}")
    return {"mse": mse, "ce": ce}[name]
