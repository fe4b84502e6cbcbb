"""Two reference estimators the throughput benchmark times beside this engine's NP step.

Both plug into `step.make_train_step(gradient=...)`, so they run in the very same sharded step.
naive_np is used for nothing else; original_np is what `--np_estimator=original` trains with.

- `naive_np`: unbiased NP written the straightforward way: each example's Gaussian noise and
  its clean and noisy forward under `vmap`, the update by `jax.grad` of a surrogate loss
  sum_i (delta_i / sigma) <xi_i, a_i(W)> with every layer's noisy input held fixed.
- `original_np`: the original research code's estimator at its HEAD: one noise draw shared by
  the whole batch and the batch-mean loss change, i.e. the engine's `--np_estimator=original`
  with Gaussian noise. Biased (docs/design/estimator.md); timed as the speed its users had.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nodepert_dist import losses, perturbation, step, taps
from nodepert_dist.estimator import NPSettings


def naive_np(*, loss: str, sigma: float, seed: int, global_batch: int):
    loss_fn = losses.get(loss)

    def gradient(model, params, x, labels, step, global_index):
        shapes = taps.tap_shapes(model, params, x)
        keys = perturbation.example_keys(seed, step, global_index)

        def one_example(key, xi, yi):
            noise = {
                k: jax.random.normal(jax.random.fold_in(key, taps.tap_id(k)), s)
                for k, s in shapes.items()
            }
            clean_logits = model.apply({"params": params}, xi[None])
            noisy_logits, values = taps.forward(
                model, params, xi[None], {k: sigma * n[None] for k, n in noise.items()}
            )
            clean = loss_fn(clean_logits, yi[None])[0]
            delta = loss_fn(noisy_logits, yi[None])[0] - clean
            return delta, noise, {k: v[0] for k, v in values.items()}, clean, clean_logits[0]

        delta, noise, values, clean, logits = jax.vmap(one_example)(keys, x, labels)
        coef = jax.lax.stop_gradient(delta / (sigma * global_batch))

        def surrogate(p):
            preacts = taps.replay(model, p, x, values)
            return sum(
                jnp.sum(coef.reshape((-1,) + (1,) * (n.ndim - 1)) * n * preacts[k])
                for k, n in noise.items()
            )

        return jax.grad(surrogate)(params), clean, logits

    return gradient


def original_np(*, loss: str, sigma: float, seed: int, global_batch: int):
    # The engine's own `--np_estimator=original` (perturbation.original_gradient), with the
    # original code's Gaussian noise.
    return step.local_gradient(
        update_rule="np",
        loss=loss,
        seed=seed,
        global_batch=global_batch,
        np=NPSettings(sigma=sigma, noise="gaussian", np_estimator="original"),
    )
