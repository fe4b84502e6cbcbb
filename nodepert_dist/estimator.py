"""The estimator a run trains with: its settings (`NPSettings`, the "node perturbation" flags) and
`build(np, ...)`, the local gradient those settings choose (perturbation.py holds the math).

Everything that computes an NP estimate for a run (the train step through `step.local_gradient`,
the probes of the experiments) gets it from `build` with the run's whole NPSettings, so a
probe measures exactly the estimator the run trains with.
"""

from __future__ import annotations

import dataclasses

import jax

from nodepert_dist import perturbation
from nodepert_dist import settings as settings_lib
from nodepert_dist.settings import setting

_NP = "node perturbation"


@dataclasses.dataclass(frozen=True)
class NPSettings:
    """The estimator's settings, handed to `build` whole; part of config.Config. A new
    option is a field here, its check in `validate` and its use in `build` and
    perturbation.np_gradient."""

    sigma: float | None = setting(
        None,
        "NP noise scale (default: 1e-5 for conv/conv-large, "
        "1e-4 otherwise; in bfloat16 the measured floor, see "
        "docs/results/bf16_sigma.md).",
        group=_NP,
    )
    noise: str = setting(
        "rademacher",
        "NP noise distribution: rademacher (random signs; on "
        "CPU ~40x cheaper to draw) or gaussian.",
        group=_NP,
        choices=perturbation.NOISE_KINDS,
    )
    np_mode: str = setting(
        "keep",
        "keep: reuse the noise of the noisy pass in the update; "
        "regen: draw it again from its keys (nothing kept alive). Same "
        "update.",
        group=_NP,
        choices=perturbation.NP_MODES,
    )
    np_microbatches: int = setting(
        1,
        "Run NP over this many slices of each device's batch in "
        "turn: activation memory / N, same update and FLOPs.",
        group=_NP,
    )
    np_antithetic: bool = setting(
        False,
        "Noisy passes at +sigma*xi and -sigma*xi replace clean "
        "and noisy, delta = (L+ - L-)/2; same FLOPs.",
        group=_NP,
    )
    np_draws: int = setting(
        1,
        "Noise draws per example sharing one clean pass, averaged "
        "(variance / K, cost ~K noisy passes).",
        group=_NP,
    )
    np_delta: str = setting(
        "finite",
        "finite (loss difference / sigma) or jvp (the exact "
        "directional derivative along the noise by forward-mode AD: the "
        "sigma -> 0 limit, no rounding).",
        group=_NP,
        choices=perturbation.NP_DELTAS,
    )
    np_layerwise: bool = setting(
        False,
        "One noisy pass per tap, perturbing that tap alone; each "
        "tap's update uses its own pass's delta. Cost: one noisy pass "
        "per tap.",
        group=_NP,
    )
    np_estimator: str = setting(
        "per_example",
        "per_example: each example's own noise and loss "
        "change (unbiased). original: the original research code's "
        "estimator, for comparison only: one noise draw shared by the "
        "batch and the batch-mean loss change; BIASED (docs/design). "
        "shared_noise: the original code's 2021 estimator, behind its "
        "published figures: one noise draw shared by the batch, each "
        "example's own loss change; unbiased, but its variance does not "
        "fall with the batch size.",
        group=_NP,
        choices=perturbation.NP_ESTIMATORS,
    )
    np_local: bool = setting(
        False,
        "fc, linfc, conv, conv-large: block-local losses. Each hidden "
        "layer gets an auxiliary linear readout (conv: of its spatially "
        "averaged output; trained by NP too); each block's update "
        "uses the change of its own readout's loss, noise on its taps "
        "only.",
        group=_NP,
    )

    def validate(self) -> None:
        settings_lib.check_choices(self)
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"--sigma={self.sigma} must be positive")
        settings_lib.check_positive(self, "np_microbatches", "np_draws")
        perturbation.check_options(
            self.np_mode,
            self.np_antithetic,
            self.np_draws,
            self.np_delta,
            estimator=self.np_estimator,
            layerwise=self.np_layerwise,
            microbatches=self.np_microbatches,
            local=self.np_local,
        )


def build(np: NPSettings, loss_fn, *, seed: int, global_batch: int, axis_name: str):
    """The local gradient of these settings: `f(model, params, x, labels, step, global_index)
    -> (this device's share of the global-batch estimate, per-example loss, logits)`.
    np_estimator="original" reduces its loss change over `axis_name` (inside a shard_map);
    "shared_noise" is the same draw with each example's own loss change."""
    if np.sigma is None:
        raise ValueError("NPSettings.sigma is None: resolve it first (Config.resolved)")
    if isinstance(np.sigma, jax.core.Tracer):  # a --population member's: checked per member
        dataclasses.replace(np, sigma=1.0).validate()
    else:
        np.validate()
    if np.np_estimator in ("original", "shared_noise"):

        def original(model, params, x, labels, step, global_index):
            del global_index  # one noise draw for the whole batch
            return perturbation.original_gradient(
                model,
                params,
                x,
                labels,
                loss_fn,
                sigma=np.sigma,
                key=perturbation.step_key(seed, step),
                normalizer=global_batch,
                noise_kind=np.noise,
                axis_name=axis_name,
                per_example_delta=np.np_estimator == "shared_noise",
            )

        return original
    options = dict(
        antithetic=np.np_antithetic,
        draws=np.np_draws,
        delta=np.np_delta,
        layerwise=np.np_layerwise,
        **({"local": True} if np.np_local else {}),
    )

    def per_example(model, params, x, labels, step, global_index):
        return perturbation.np_gradient(
            model,
            params,
            x,
            labels,
            loss_fn,
            sigma=np.sigma,
            keys=perturbation.example_keys(seed, step, global_index),
            normalizer=global_batch,
            noise_kind=np.noise,
            mode=np.np_mode,
            microbatches=np.np_microbatches,
            **options,
        )

    return per_example
