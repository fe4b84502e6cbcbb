"""Node taps: the sites where node perturbation puts its noise, in any flax linen model.

Place `Tap()` after a pre-activation (after the linear map and any per-example normalisation,
before the nonlinearity). Outside the NP estimator a tap is the identity. The estimator runs the
model in three ways, through flax variable collections:

  forward    `forward(model, params, x, noise=...)` adds each tap's noise and returns every
             tap's (noisy) value, keyed by the tap's module path ("block0/tap1");
  replay     `replay(model, params, x, values)`: each tap returns the given value instead of its
             input, and the result is every tap's own pre-activation. Downstream of a tap
             nothing depends on the parameters, so the VJP of one tap's pre-activation is the
             weight-gradient op of the computation from the previous taps to that tap, with no
             backward chain: the NP update of docs/design/estimator.md. `replay_by_tap` cuts
             one trace of it into those per-tap computations;
  plain      `model.apply(...)`: logits, as SGD and evaluation use them.

`check(model, params, x)` refuses, by name, any parameter that reaches no tap or reaches one only
through another tap (its NP update would be silently zero), and models with batch statistics.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
from flax import traverse_util
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: which inputs reach outputs

from nodepert_dist import threefry_cpu  # noqa: F401  (models and noise import taps: registered first)
from nodepert_dist.decorrelation import DECOR

NOISE, VALUES, REPLAY, PREACTS = "tap_noise", "tap_values", "tap_replay", "tap_preacts"


class Tap(nn.Module):
    """A node-perturbation site: the identity on a pre-activation, except inside the estimator."""

    @nn.compact
    def __call__(self, a):
        if self.has_variable(NOISE, "xi"):
            a = a + self.get_variable(NOISE, "xi").astype(a.dtype)
        if self.has_variable(REPLAY, "value"):
            self._put(PREACTS, a)
            return jax.lax.stop_gradient(self.get_variable(REPLAY, "value")).astype(a.dtype)
        self._put(VALUES, a)
        return a

    def _put(self, collection, value):
        if self.is_initializing() or not self.is_mutable_collection(collection):
            return
        if self.has_variable(collection, "value"):
            raise ValueError(
                f"tap {'/'.join(self.scope.path)} is called twice in one forward "
                f"pass; give each perturbation site its own Tap"
            )
        self.put_variable(collection, "value", value)


def tap_id(name: str) -> int:
    """The tap's noise stream: a stable hash of its path, so adding a tap moves no other's noise
    (Python's hash() is salted per process, which would break multi-process runs)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _flat(collection) -> dict:
    """{"block0/tap1": array} from a collection nested like the module tree."""
    return {
        k[: -len("/value")]: v
        for k, v in traverse_util.flatten_dict(dict(collection), sep="/").items()
    }


def _nested(flat: dict, leaf: str) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")) + (leaf,): v for k, v in flat.items()})


def forward(model, params, x, noise: dict | None = None):
    """(logits, {tap name: tap value}) with `noise` ({tap name: array}) added at the taps."""
    variables = {"params": params}
    if noise:
        variables[NOISE] = _nested(noise, "xi")
    logits, state = model.apply(variables, x, mutable=[VALUES])
    return logits, _flat(state.get(VALUES, {}))


def replay(model, params, x, values: dict) -> dict:
    """{tap name: pre-activation}, with each tap's output replaced by `values[name]`."""
    _, state = model.apply(
        {"params": params, REPLAY: _nested(values, "value")}, x, mutable=[PREACTS]
    )
    return _flat(state[PREACTS])


class Segment(NamedTuple):
    """The computation from the previous taps to one tap, in replay (`replay_by_tap`)."""

    params: tuple  # the indices, in jax.tree.leaves(params), of the parameters it reads
    values: tuple  # the taps whose replay values it reads
    preact: Callable  # (those parameters' arrays, {tap: value}) -> the tap's pre-activation


def replay_by_tap(model, params, x, values: dict) -> dict:
    """{tap name: Segment} of `replay(model, params, x, values)` for arguments shaped like these.
    The replay is traced once (jax.make_jaxpr) and cut per tap by dead-code elimination, so a
    segment holds only its own part of the model: the estimator's one VJP per tap then traces
    and compiles what it uses, where a VJP of the whole replay per tap (and sums over every
    parameter and value per tap) grew with depth squared (docs/results/compile_time.md)."""
    closed, out = jax.make_jaxpr(lambda p, v: replay(model, p, x, v), return_shape=True)(
        params, values
    )
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)  # the closure's arrays as leading inputs
    n_consts, n_params = len(closed.consts), len(jax.tree.leaves(params))
    value_names = list(jax.tree.unflatten(jax.tree.structure(values), range(len(values))))
    n_out = len(closed.jaxpr.outvars)

    def segment(index):
        cut, used = pe.dce_jaxpr(jaxpr, [i == index for i in range(n_out)])
        consts = [c for c, u in zip(closed.consts, used) if u]
        p_used = tuple(i for i in range(n_params) if used[n_consts + i])
        v_used = tuple(n for i, n in enumerate(value_names) if used[n_consts + n_params + i])

        def preact(p_arrays, v_arrays):
            (a,) = jax.core.eval_jaxpr(cut, [], *consts, *p_arrays, *(v_arrays[n] for n in v_used))
            return a

        return Segment(p_used, v_used, preact)

    outputs = jax.tree.unflatten(jax.tree.structure(out), range(n_out))
    return {name: segment(index) for name, index in outputs.items()}


def tap_shapes(model, params, x) -> dict:
    """{tap name: per-example shape}, in the order the taps run (jax returns dicts sorted by
    key, so the order is read from the trace itself)."""
    order = []

    def values():
        _, v = forward(model, params, x[:1])
        order.extend(v)
        return v

    shapes = jax.eval_shape(values)
    return {name: shapes[name].shape[1:] for name in order}


def check(model, params, x, *, needs_taps: bool = True) -> dict | None:
    """One-line errors for a model NP cannot train (see the module docstring); with
    `needs_taps`, returns `tap_shapes(model, params, x)` (traced once per step, not twice)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
    if "batch_stats" in variables:
        raise ValueError(
            f"{type(model).__name__} uses batch norm: batch statistics mix the "
            f"examples of a batch, so each example's loss change would carry the "
            f"others' noise and NP would be biased; use GroupNorm or LayerNorm"
        )
    other = sorted(set(variables) - {"params", DECOR})  # the train state carries DECOR
    if other:
        raise ValueError(
            f"{type(model).__name__} has mutable state ({', '.join(other)}), "
            f"which the train step does not carry; use a model with params only"
        )
    if not needs_taps:
        return None
    shapes = tap_shapes(model, params, x)
    if not shapes:
        raise ValueError(
            f"{type(model).__name__} has no Tap: put nodepert_dist.taps.Tap() after "
            f"each pre-activation so node perturbation has nodes to perturb"
        )
    values = {k: jax.ShapeDtypeStruct((1, *s), jax.numpy.float32) for k, s in shapes.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    closed = jax.make_jaxpr(lambda p, v: replay(model, p, x[:1], v))(params, values)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    unreached = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for (path, _), u in zip(leaves, used[: len(leaves)])
        if not u
    ]
    if unreached:
        raise ValueError(
            f"parameter {unreached[0]} reaches no Tap except through another Tap, "
            f"so node perturbation cannot train it"
            + (f" (nor {len(unreached) - 1} more)" if len(unreached) > 1 else "")
            + "; put a Tap after the pre-activation it computes"
        )
    return shapes
