"""Two reference estimators the throughput benchmark times beside this engine's NP step.

Both plug into `step.make_train_step(gradient=...)`, so they run in the very same sharded step.
Neither is used for training.

- `naive_np`: unbiased NP written the straightforward way: each example's Gaussian noise and
  its clean and noisy forward under `vmap`, the update by `jax.grad` of a surrogate loss
  sum_i (delta_i / sigma) <xi_i, a_i(W)> with every layer's noisy input held fixed.
- `original_np`: the original research code's estimator at its HEAD: one noise draw shared by
  the whole batch and the batch-mean loss change. Biased (DESIGN.md section 2); timed only as
  the speed its users had. On several devices each averages delta over its own examples (the
  original ran on one GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nodepert_dist import losses, perturbation


def _layer_shapes(apply_fn, params, x):
    return [s.shape[1:] for s in jax.eval_shape(lambda: apply_fn(params, x[:1]))[1]]


def naive_np(*, loss: str, sigma: float, seed: int, global_batch: int):
    loss_fn = losses.get(loss)

    def gradient(apply_fn, params, x, labels, step, global_index):
        shapes = _layer_shapes(apply_fn, params, x)
        keys = perturbation.example_keys(seed, step, global_index)

        def one_example(key, xi, yi):
            noise = [jax.random.normal(jax.random.fold_in(key, l), s) for l, s in enumerate(shapes)]
            clean_logits = apply_fn(params, xi[None])[0]
            noisy_logits, _, inputs = apply_fn(params, xi[None], noise=[sigma * n[None] for n in noise])
            clean = loss_fn(clean_logits, yi[None])[0]
            delta = loss_fn(noisy_logits, yi[None])[0] - clean
            return delta, noise, [h[0] for h in inputs], clean, clean_logits[0]

        delta, noise, inputs, clean, logits = jax.vmap(one_example)(keys, x, labels)
        coef = jax.lax.stop_gradient(delta / (sigma * global_batch))

        def surrogate(p):
            preacts = apply_fn(p, x, layer_inputs=inputs)[1]
            return sum(jnp.sum(coef.reshape((-1,) + (1,) * (n.ndim - 1)) * n * a)
                       for n, a in zip(noise, preacts))

        return jax.grad(surrogate)(params), clean, logits

    return gradient


def original_np(*, loss: str, sigma: float, seed: int, global_batch: int):
    loss_fn = losses.get(loss)

    def gradient(apply_fn, params, x, labels, step, global_index):
        del global_index  # one draw for the whole batch
        shapes = _layer_shapes(apply_fn, params, x)
        key = jax.random.fold_in(perturbation.stream_key(seed, "noise"), step)
        noise = [jnp.broadcast_to(jax.random.normal(jax.random.fold_in(key, l), s), (x.shape[0],) + s)
                 for l, s in enumerate(shapes)]
        clean_logits = apply_fn(params, x)[0]
        noisy_logits, _, inputs = apply_fn(params, x, noise=[sigma * n for n in noise])
        clean = loss_fn(clean_logits, labels)
        mean_delta = jnp.mean(loss_fn(noisy_logits, labels) - clean)
        preacts, vjp_fn = jax.vjp(lambda p: apply_fn(p, x, layer_inputs=inputs)[1], params)
        scale = mean_delta / (sigma * global_batch)
        (grads,) = vjp_fn([(scale * n).astype(a.dtype) for n, a in zip(noise, preacts)])
        return grads, clean, clean_logits

    return gradient
