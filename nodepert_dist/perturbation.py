"""The node-perturbation (NP) gradient estimator; its noise streams are noise.py's.

The estimator (docs/design/estimator.md), for a batch of B examples:

    delta_i = L_i(noisy) - L_i(clean)                          one scalar per example
    g_l     = (1/B) sum_i (delta_i / sigma) J_{W_l}[f_l](h~_{l-1,i})^T xi_{l,i}

where f_l is the computation from the previous taps to tap l (taps.py): the model runs in
replay with every tap's output fixed at its noisy value, so each VJP is the weight-gradient op
of the parameters feeding that tap, with no backward chain. The clean and noisy passes are two B-sized forwards of the same parameters and inputs, noise on
the noisy one only: XLA computes the first layer's pre-activation once for both (common
subexpression), which is what puts NP's matmul FLOPs at SGD's. Per-example delta_i is
essential: a batch-mean delta times per-example terms is biased.

Precision: delta_i is a finite difference of float32 losses, and nothing cancels its rounding.
Relative error of float32 delta against float64 with the same noise (B=128, either noise kind):
fc 784-500-500-10: 3e-4 / 3e-3 / 2.5e-2 at sigma 1e-3 / 1e-4 / 1e-5; conv: 1.6e-4 / 1.6e-3 /
1.7e-2. The rounding adds variance, not bias; prefer sigma >= 1e-4 in float32.

Modes (`--np_mode`), the same update with a different memory/compute trade-off:
  keep   the noise drawn for the noisy pass is kept for the weight-gradient ops (default);
  regen  each layer's noise is drawn again from its keys when its weight-gradient op runs, so
         no noise stays alive across the forward. Measured on the CPU (conv-large, CIFAR shape,
         B=128, peak temp memory): Rademacher 130 -> 128 MB (XLA keeps its packed bits, 1/32
         of the nodes, anyway); Gaussian 349 -> 523 MB, because XLA's CPU threefry materialises
         several noise-sized uint32 intermediates per draw and regen draws twice.
`microbatches` (`--np_microbatches`) runs the estimator over slices of the device's examples in
sequence: NP needs no backward chain, so nothing but the gradient sum crosses slices.

Variance reduction (issue 10), each still NP (one scalar loss change per example, per-node noise):
  antithetic  (`--np_antithetic`) passes at +sigma*xi and -sigma*xi replace the clean and noisy
              ones: delta_i = (L_i(+) - L_i(-)) / 2 cancels the even orders of the loss in sigma
              (the curvature term sigma/2 xi^T H xi). Same matmul cost. The replay (layer
              inputs) is at the mean of the two passes' tap values; the step's loss/accuracy
              metrics are of the mean of their losses and logits (the clean values to
              O(sigma^2); no third pass for metrics). With zero-mean symmetric noise (both
              kinds here) the one-sided estimator's O(sigma) bias term, E[(xi^T H xi) xi], is
              already zero: what antithetic removes is that term's variance, which grows with
              sigma; the remaining bias is O(sigma^2) for both (tests/test_variance.py).
  draws=K     (`--np_draws`) K noise draws per example share one clean pass; the K estimates
              are averaged. Draw 0 is the usual noise; draw d > 0 folds d into the example key.
              Cost: K noisy passes and K weight-gradient ops per tap.
  delta=jvp   (`--np_delta=jvp`) delta_i / sigma is the exact directional derivative of L_i
              along xi (forward-mode jax.linearize through the forward, noise as its argument),
              the sigma -> 0 limit of the finite difference: a noise-free reference that needs
              no sigma. Replay at the clean values. Cost: one forward and one tangent pass per
              draw/group.
  layerwise   (`--np_layerwise`) one noisy pass per tap, each perturbing that tap alone; a tap's
              update uses only its own pass's delta, so it carries no other tap's noise. Cost: one
              noisy pass per tap (XLA shares the clean prefix up to the tap).

Block-local losses (`--np_local`, models.MLP/ConvStack(local_heads=True)): each hidden layer with its
auxiliary readout head is a block, the readout layer another (`local_blocks`). The estimate is
layer-wise NP over blocks: one noisy pass per block with noise on that block's taps only, and
delta_i the change of that block's own loss (read at its head's tap; the readout block's is the
network's loss). The heads learn by NP like every other layer. E[g] is the gradient of each
block's local objective with the block's input held fixed (tests/test_local_losses.py).

The original research code's estimator (`--np_estimator=original`, `original_gradient`), kept as
a labelled reference to compare against, never the default: ONE noise draw shared by every
example of the global batch and the batch-MEAN loss change,

    g_l = (mean_i delta_i / sigma) (1/B) sum_i J_{W_l}[f_l](h~_{l-1,i})^T xi_l.

Biased (docs/design/estimator.md): to first order in sigma its expectation for a dense layer is
(mean_i h_{l-1,i}) outer (mean_i dL_i/da_{l,i}), the product of the batch means, where the
gradient is the batch mean of the products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nodepert_dist import taps
from nodepert_dist.noise import (  # noqa: F401 (the noise streams, also read as perturbation.*)
    NOISE_KINDS,
    draw_keys,
    draw_layer,
    draw_noise,
    example_keys,
    step_key,
    stream_key,
)

NP_MODES = ("keep", "regen")
NP_DELTAS = ("finite", "jvp")
NP_ESTIMATORS = ("per_example", "original", "shared_noise")
HEAD_PREFIX = "head_"  # --np_local: the tap of tap t's auxiliary readout head is head_t


def np_gradient(model, params, x, labels, loss_fn, *, sigma: float, keys, normalizer,
                noise_kind: str = "rademacher", mode: str = "keep", microbatches: int = 1,
                antithetic: bool = False, draws: int = 1, delta: str = "finite",
                layerwise: bool = False, local: bool = False):
    """NP estimate of the gradient of the mean loss, summed over these examples / `normalizer`.

    `model` is a flax module with taps (taps.py). Returns (grads, per-example clean loss, clean
    logits). Pass `normalizer` = global batch size so that summing the result over devices gives
    the global-batch estimate. `microbatches` > 1 runs the estimate over that many consecutive
    slices of the examples in sequence (each with its own examples' keys, so the update is the
    same) and sums them: activation memory / K. `antithetic`, `draws`, `delta` and `layerwise`
    are the variance-reduction options of the module docstring; `local`: block-local losses.
    """
    check_options(mode, antithetic, draws, delta, layerwise=layerwise, local=local)
    shapes = taps.check(model, params, x)
    options = dict(antithetic=antithetic, draws=draws, delta=delta, layerwise=layerwise,
                   shapes=shapes)
    if local:
        options["local"] = True
    estimate = lambda x, labels, keys: _np_estimate(model, params, x, labels, loss_fn, sigma,
                                                    keys, normalizer, noise_kind, mode, **options)
    if microbatches == 1:
        return estimate(x, labels, keys)
    if x.shape[0] % microbatches:
        raise ValueError(f"--np_microbatches={microbatches} does not divide the {x.shape[0]} "
                         f"examples per device; use a divisor of the per-device batch")
    # Unrolled, each slice (its inputs and its noise draws) starting after the previous one's
    # gradient (a zero-valued data dependency, as in _np_estimate): XLA's CPU convolutions ran
    # ~10x slower inside lax.scan.
    size = x.shape[0] // microbatches
    grads, losses, logits, after = None, [], [], jnp.zeros((), jnp.float32)
    for k in range(microbatches):
        part = slice(k * size, (k + 1) * size)
        g, loss, lg = estimate(x[part] + after.astype(x.dtype), labels[part],
                               _keys_after(keys[part], after))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        losses.append(loss)
        logits.append(lg)
        after = _zero_after(g)
    return grads, jnp.concatenate(losses), jnp.concatenate(logits)


def check_options(mode: str = "keep", antithetic: bool = False, draws: int = 1,
                  delta: str = "finite", *, estimator: str = "per_example",
                  layerwise: bool = False, microbatches: int = 1, local: bool = False) -> None:
    """One-line errors for estimator settings that are unknown or do not combine."""
    if local and (layerwise or estimator != "per_example"):
        raise ValueError(f"--np_local perturbs one block at a time already; drop "
                         f"{'--np_layerwise' if layerwise else '--np_estimator=' + estimator}")
    if estimator not in NP_ESTIMATORS:
        raise ValueError(f"unknown --np_estimator={estimator!r}; choose one of "
                         f"{', '.join(NP_ESTIMATORS)}")
    if estimator != "per_example":
        extra = [flag for flag, on in (
            ("--np_antithetic", antithetic), (f"--np_draws={draws}", draws != 1),
            (f"--np_delta={delta}", delta != "finite"), ("--np_layerwise", layerwise),
            (f"--np_microbatches={microbatches}", microbatches != 1),
            (f"--np_mode={mode}", mode != "keep")) if on]
        if extra:
            raise ValueError(f"--np_estimator={estimator} is the original code's estimator as "
                             f"it was, a reference; drop {', '.join(extra)}")
    if mode not in NP_MODES:
        raise ValueError(f"unknown --np_mode={mode!r}; choose one of {', '.join(NP_MODES)}")
    if delta not in NP_DELTAS:
        raise ValueError(f"unknown --np_delta={delta!r}; choose one of {', '.join(NP_DELTAS)}")
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"--np_draws={draws} must be a positive integer")
    if antithetic and delta == "jvp":
        raise ValueError("--np_antithetic does nothing with --np_delta=jvp (the directional "
                         "derivative is exact); use one of them")


def original_gradient(model, params, x, labels, loss_fn, *, sigma: float, key, normalizer,
                      noise_kind: str = "rademacher", axis_name=None,
                      per_example_delta: bool = False):
    """The original code's estimators, one noise draw shared by the whole batch: (grads, clean
    loss, logits). Default: its HEAD (2023), the batch-mean loss change times each example's
    terms, BIASED (module docstring). `per_example_delta`: its 2021 version, which made the
    published figures (`--np_estimator=shared_noise`): each example's own loss change, so
    unbiased, but the noise is common to the batch, so its variance does not fall with the
    batch size as the per-example estimator's does.

    `key`: the step's noise key (`step_key`), the same on every device; `axis_name`: the mesh
    axis the batch is split over (inside shard_map), so that the loss change is the mean over
    the global batch of `normalizer` examples and the update does not depend on the mesh."""
    shapes = taps.check(model, params, x)
    b = x.shape[0]
    clean_logits = model.apply({"params": params}, x)
    clean = loss_fn(clean_logits, labels)
    # One example's worth of noise, for all of them, drawn after the clean pass (a zero of its
    # loss, as _np_estimate does): conv-large CIFAR B=128 temp memory 121.5 -> 118.3 MB.
    shared = draw_noise(_keys_after(key[None], _zero_after(clean)), shapes, noise_kind)
    xi = {k: jnp.broadcast_to(n, (b,) + n.shape[1:]) for k, n in shared.items()}
    noisy_logits, values = taps.forward(model, params, x, {k: sigma * n for k, n in xi.items()})
    delta = loss_fn(noisy_logits, labels) - clean
    if per_example_delta:  # each example's own change: this device's examples suffice
        coef = delta / (sigma * normalizer)
    else:
        delta_sum = jnp.sum(delta)
        if axis_name is not None:  # the global batch's sum, then back to this device's share
            delta_sum = jax.lax.pcast(jax.lax.psum(delta_sum, axis_name), axis_name, to="varying")
        coef = jnp.full((b,), delta_sum / normalizer / (sigma * normalizer))
    segments = taps.replay_by_tap(model, params, x, values)
    grads, _ = _tap_gradients(segments, params, values, coef, xi, list(shapes), shapes,
                              keys=None, noise_kind=noise_kind, mode="keep", after=None)
    return _as_tree(params, grads), clean, clean_logits


def _zero_after(tree):
    """0 * (one entry of each leaf): a scalar zero XLA cannot fold, so whatever adds it runs
    after `tree` is computed. XLA's CPU pipeline drops optimization barriers before scheduling,
    so a data dependency is what orders work (and frees its memory) there. The entries go
    through nan_to_num first: 0 * inf would be NaN and leak into other layers' updates."""
    entries = sum(jnp.sum(v[(0,) * v.ndim]).astype(jnp.float32) for v in jax.tree.leaves(tree))
    return 0.0 * jnp.nan_to_num(entries, nan=0.0, posinf=0.0, neginf=0.0)


def _keys_after(keys, after):
    """The same keys, drawn from only once `after` (a zero from _zero_after) is computed."""
    later = jax.random.key_data(keys) + (after != 0).astype(jnp.uint32)
    return jax.random.wrap_key_data(later, impl=jax.random.key_impl(keys))


def local_blocks(shapes: dict) -> tuple[list, list]:
    """--np_local's blocks: ([[tap, its head's tap], ..., [last tap]], [head tap or None]).
    A tap `t` with a head tap `head_t` is a block whose loss is read at `head_t`; the last tap
    (the readout) is a block with the network's loss; any other tap is an error."""
    body = [n for n in shapes if not n.split("/")[-1].startswith(HEAD_PREFIX)]
    groups, heads = [], []
    for i, name in enumerate(body):
        head = "/".join(name.split("/")[:-1] + [HEAD_PREFIX + name.split("/")[-1]])
        if head in shapes:
            groups.append([name, head])
            heads.append(head)
        elif i == len(body) - 1:
            groups.append([name])
            heads.append(None)
        else:
            raise ValueError(f"--np_local: tap {name} has no auxiliary head ({head}); use a "
                             f"model built with local heads (--network=fc, linfc, conv or "
                             f"conv-large)")
    return groups, heads


def _np_estimate(model, params, x, labels, loss_fn, sigma, keys, normalizer, noise_kind, mode,
                 antithetic=False, draws=1, delta="finite", layerwise=False, local=False, *,
                 shapes):
    groups = [[n] for n in shapes] if layerwise else [list(shapes)]
    heads = [None] * len(groups)  # where each group's loss is read (None: the logits)
    if local:
        groups, heads = local_blocks(shapes)
    clean = metrics = None
    if delta == "finite" and not antithetic:  # the one clean pass every draw shares
        clean_values = None
        if local:
            clean_logits, clean_values = taps.forward(model, params, x)
        else:
            clean_logits = model.apply({"params": params}, x)
        clean = loss_fn(clean_logits, labels)
        metrics = (clean, clean_logits)
    block_loss = lambda logits_loss, values, head: (
        logits_loss if head is None else loss_fn(values[head], labels))

    segments = None  # taps.replay_by_tap, traced once
    grads, after = None, None  # after: a zero that orders each draw/group after the previous
    for d in range(draws):
        if d == 0:  # after the clean pass, if any (a zero of its loss): no noise alive during
            # it; measured: resnet's peak temp memory 97.4 -> 92.6 MB (as drawn per tap before)
            draw_k = keys if clean is None else _keys_after(keys, _zero_after(clean))
        else:
            draw_k = _keys_after(draw_keys(keys, d), after)
        xi = draw_noise(draw_k, shapes, noise_kind)
        for group, head in zip(groups, heads):
            noise = {k: xi[k] if after is None else xi[k] + after.astype(xi[k].dtype)
                     for k in group}
            if delta == "jvp":
                # Forward-mode derivative with the noise as the argument, at zero noise: the
                # primal is the clean pass, the tangent delta_i / sigma (only `group` perturbed;
                # the other taps get no noise variable, so no tangent work).
                def forward(n, head=head):
                    logits, values = taps.forward(model, params, x, n)
                    loss = loss_fn(logits, labels)
                    if head is None:
                        return loss, logits, values
                    return block_loss(loss, values, head), (loss, logits), values
                zero = {k: jnp.zeros_like(n) for k, n in noise.items()}
                (loss, logits, values), (diff, _, _) = jax.jvp(forward, (zero,), (noise,))
                if head is not None:
                    loss, logits = logits
                metrics, scale = metrics or (loss, logits), 1.0
            else:
                plus_logits, values = taps.forward(model, params, x,
                                                   {k: sigma * n for k, n in noise.items()})
                plus = loss_fn(plus_logits, labels)
                if antithetic:
                    minus_logits, minus_values = taps.forward(
                        model, params, x, {k: -sigma * n for k, n in noise.items()})
                    minus = loss_fn(minus_logits, labels)
                    # Replay at the pair's mean: the O(sigma) change of the layer inputs cancels
                    # (measured, fc-mse at sigma 0.3 / 1.0: bias 0.116 -> 0.102 / 0.454 -> 0.312).
                    values_plus = values
                    values = {k: (v + minus_values[k]) / 2 for k, v in values.items()}
                    metrics = metrics or ((plus + minus) / 2, (plus_logits + minus_logits) / 2)
                    diff = (block_loss(plus, values_plus, head)
                            - block_loss(minus, minus_values, head)) / 2
                else:
                    # float32 or wider, one per example
                    diff = block_loss(plus, values, head) - block_loss(clean, clean_values, head)
                scale = sigma
            coef = diff / (scale * normalizer * draws)
            if segments is None:  # one trace of the replay for every draw and group
                segments = taps.replay_by_tap(model, params, x, values)
            grads, after = _tap_gradients(segments, params, values, coef, xi, group, shapes,
                                          keys=draw_k, noise_kind=noise_kind, mode=mode,
                                          after=after, into=grads)
    return _as_tree(params, grads), metrics[0], metrics[1]


def _tap_gradients(segments, params, values, coef, xi, group, shapes, *, keys, noise_kind, mode,
                   after, into=None):
    """Adds to `into` (a list over jax.tree.leaves(params), None for nothing yet; new if None)
    the VJP of each tap of `group`'s pre-activation (replay at `values`; `segments`:
    taps.replay_by_tap) with cotangent coef_i * xi_i; returns it and a zero that orders later
    work after it. Each VJP is of its tap's segment alone (its parameters, its inputs), so the
    work per tap does not grow with depth."""
    # One tap at a time from the last to the first, each the VJP of its own pre-activation in
    # replay. A zero-valued data dependency on the previous tap's result makes XLA finish one
    # tap before it starts the next one's cotangent and input transposes, so each noisy value
    # is freed as soon as it is used.
    # Measured on conv-large, CIFAR shape, B=128: peak temp memory 310 -> 130 MB (SGD 217).
    leaves = jax.tree.leaves(params)
    into = [None] * len(leaves) if into is None else into
    after = jnp.zeros((), coef.dtype) if after is None else after.astype(coef.dtype)
    for name in reversed(group):
        segment = segments[name]
        # The step's input x gets no `after`: it is alive anyway, and adding would copy it.
        replay_values = {k: jax.lax.stop_gradient(values[k]) + after.astype(values[k].dtype)
                         for k in segment.values}
        preact, vjp_fn = jax.vjp(lambda *p: segment.preact(p, replay_values),  # noqa: B023 (vjp calls it here)
                                 *(leaves[i] for i in segment.params))
        noise = xi[name]
        if mode == "regen":  # this tap's noise again, drawn only now
            noise = draw_layer(_keys_after(keys, after), taps.tap_id(name), shapes[name],
                               noise_kind)
        coef_l = (coef + after).reshape((-1,) + (1,) * (noise.ndim - 1))
        g = vjp_fn((coef_l * noise).astype(preact.dtype))
        for i, gi in zip(segment.params, g):
            into[i] = gi if into[i] is None else into[i] + gi
        after = _zero_after(g).astype(coef.dtype)
    return into, after


def _as_tree(params, into):
    """The parameter tree of `_tap_gradients`' sums (zeros where no tap added any)."""
    leaves, tree = jax.tree.flatten(params)
    return jax.tree.unflatten(
        tree, [jnp.zeros_like(p) if g is None else g for p, g in zip(leaves, into)])
