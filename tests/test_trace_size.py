"""NP's traced program grows linearly with depth (issue 21: its compile time grew with depth
squared). Counted on the jaxpr, deterministic and without compiling: XLA's compile time follows
the program's size (benchmarks/compile_time.py; docs/results/compile_time.md)."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core

from nodepert_dist import losses, models, perturbation

X, Y = jnp.ones((2, 3)), jnp.array([0, 1])
DEPTHS = (2, 4, 8)  # hidden layers


def _count(jaxpr) -> dict:
    """{"eqns": equations, "hashes": threefry2x32 hashes and random_bits draws}, nested jaxprs
    included."""
    n = {"eqns": 0, "hashes": 0}
    for eqn in jaxpr.eqns:
        n["eqns"] += 1
        n["hashes"] += eqn.primitive.name in ("threefry2x32", "random_bits") or (
            eqn.params.get("name") == "threefry_rolled"  # noise.draw_noise's, a loop
        )
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
                    inner = _count(getattr(sub, "jaxpr", sub))
                    n = {k: n[k] + inner[k] for k in n}
    return n


def _np_size(n_hl: int, **options) -> dict:
    model = models.build_model("fc", 2, n_hl=n_hl, hl_size=4)
    params = model.init(jax.random.key(0), X)["params"]

    def estimate(params, step):
        return perturbation.np_gradient(
            model,
            params,
            X,
            Y,
            losses.mse,
            sigma=1e-2,
            keys=perturbation.example_keys(0, step, jnp.arange(2)),
            normalizer=2,
            **options,
        )[0]

    return _count(jax.make_jaxpr(estimate)(params, jnp.int32(0)).jaxpr)


OPTIONS = {
    "default": {},
    "gaussian": dict(noise_kind="gaussian"),
    "antithetic": dict(antithetic=True),
    "jvp": dict(delta="jvp"),
    "2-draws": dict(draws=2),
    "2-microbatches": dict(microbatches=2),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_np_trace_grows_linearly_with_depth(option):
    """Equal steps of depth add equal work: 2 -> 4 -> 8 hidden layers, the second step adds
    twice the first (a VJP of the whole model per tap added more per layer the deeper the
    net), and Rademacher noise is hashed the same number of times at every depth (it was twice
    per tap: each hash a loop XLA compiled in ~0.2 s on the CPU; Gaussian noise is still drawn
    tap by tap, for memory: noise.draw_noise)."""
    small, mid, deep = (_np_size(n, **OPTIONS[option]) for n in DEPTHS)
    assert deep["eqns"] - mid["eqns"] <= 2 * (mid["eqns"] - small["eqns"]), (small, mid, deep)
    if option != "gaussian":
        assert small["hashes"] == deep["hashes"] > 0, (small, deep)


def test_np_traces_the_tap_shapes_once(monkeypatch):
    """taps.check returns the tap shapes the estimator uses: one trace of the model for them
    per step, not one in the check and another in the estimator."""
    calls = []
    shapes = perturbation.taps.tap_shapes
    monkeypatch.setattr(perturbation.taps, "tap_shapes", lambda *a: calls.append(1) or shapes(*a))
    for estimator in (_np_size, _original_size):
        calls.clear()
        estimator(2)
        assert len(calls) == 1, estimator


def _original_size(n_hl: int) -> None:
    model = models.build_model("fc", 2, n_hl=n_hl, hl_size=4)
    params = model.init(jax.random.key(0), X)["params"]
    jax.make_jaxpr(
        lambda p: perturbation.original_gradient(
            model,
            p,
            X,
            Y,
            losses.mse,
            sigma=1e-2,
            key=perturbation.step_key(0, 0),
            normalizer=2,
        )[0]
    )(params)
