"""The bfloat16 sigma floor: the smallest NP noise scale whose mean estimate stays unbiased.

For each network (small widths, 8x8x3 inputs, batch 32, cross-entropy) and each sigma of a grid,
`--draws` NP estimates run in bf16 and, with the very same noise, in float32. Reported per
sigma: the worst per-leaf cosine and norm ratio of the bf16 mean against the float32 mean (the
noise's own variance cancels in this paired comparison, so what is left is what bf16 changes),
and of the float32 mean against jax.grad (the finite-sigma bias, and the variance left after
this many draws). Below the floor bf16 rounds the noise away at the taps (|a| ~ 1 has a 2^-8
spacing) and in the loss change, and the estimate shrinks and turns. The floors go into
models.BF16_SIGMA_FLOOR, the table into docs/results/bf16_sigma.md; tests/test_estimator.py
checks the floor with the unpaired Monte-Carlo test.

    python benchmarks/bf16_sigma.py --networks=fc,conv,vgg,resnet --draws=4000
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from nodepert_dist import cli, files, losses, models, perturbation

BATCH = 32


def mean_estimates(models_, params, x, y, sigma, draws):
    """The mean NP estimate of each model (same parameters, same noise draws)."""

    def one(step):
        keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
        return [
            perturbation.np_gradient(
                m, params, x.astype(m.dtype), y, losses.ce, sigma=sigma, keys=keys, normalizer=BATCH
            )[0]
            for m in models_
        ]

    zero = [jax.tree.map(jnp.zeros_like, params) for _ in models_]
    total = jax.jit(
        lambda: jax.lax.fori_loop(0, draws, lambda i, acc: jax.tree.map(jnp.add, acc, one(i)), zero)
    )()
    return jax.tree.map(lambda a: a / draws, total)


def _keys_like(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(2), len(leaves))))


def worst(mean, true):
    cos = [
        float(jnp.vdot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
        for u, v in zip(jax.tree.leaves(mean), jax.tree.leaves(true))
    ]
    ratio = [
        float(jnp.linalg.norm(u) / jnp.linalg.norm(v))
        for u, v in zip(jax.tree.leaves(mean), jax.tree.leaves(true))
    ]
    return min(cos), min(ratio), max(ratio)


def _comma_list(kind):
    """argparse type of a comma list whose items `kind` checks (a bad item: one-line error)."""

    def parse(text):
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _network(name):
    if name not in models.NETWORKS:
        raise ValueError(f"{name!r} is not one of {', '.join(models.NETWORKS)}")
    return name


def main():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="fc,conv,vgg,resnet", type=_comma_list(_network))
    parser.add_argument("--sigmas", default="1e-3,3e-3,1e-2,3e-2,1e-1", type=_comma_list(float))
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--out", default="benchmarks/results/bf16_sigma.json")
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(1), (BATCH, 8, 8, 3))
    y = jnp.arange(BATCH) % 10
    rows = []
    for network in args.networks:
        base = models.build_model(network, 10, n_hl=2, hl_size=32, width=2)
        params = base.init(jax.random.key(0), x)["params"]
        # Zero-initialised leaves (biases, resnet's residual-branch convs) get small random
        # values: with a zero residual branch the gradients before it are exactly zero, and
        # cosines of noise against zero would say nothing about bf16.
        params = jax.tree.map(
            lambda p, k: p if jnp.any(p) else 0.1 * jax.random.normal(k, p.shape),
            params,
            _keys_like(params),
        )
        true = jax.grad(lambda p: jnp.mean(losses.ce(base.apply({"params": p}, x), y)))(params)  # noqa: B023 (called here)
        for sigma in args.sigmas:
            t = time.time()
            f32, bf16 = mean_estimates(
                [base, base.clone(dtype=jnp.bfloat16)], params, x, y, sigma, args.draws
            )
            row = dict(network=network, sigma=sigma, draws=args.draws)
            for name, (a, b) in {"bf16_vs_f32": (bf16, f32), "f32_vs_grad": (f32, true)}.items():
                cos, lo, hi = worst(a, b)
                row[name] = dict(min_cosine=round(cos, 4), norm_ratio=[round(lo, 3), round(hi, 3)])
            c = row["bf16_vs_f32"]
            row["bf16_ok"] = (
                c["min_cosine"] >= 0.99
                and 0.85 <= c["norm_ratio"][0]
                and c["norm_ratio"][1] <= 1.15
            )
            rows.append(row)
            print(json.dumps(row), f"({time.time() - t:.0f} s)", flush=True)
    files.write_json(args.out, rows)
    print("\nbf16 mean vs float32 mean, same noise: worst cosine / norm ratio range")
    print("| network | " + " | ".join(f"sigma {s}" for s in args.sigmas) + " | floor |")
    print("|---" * (len(args.sigmas) + 2) + "|")
    for network in args.networks:
        mine = [r for r in rows if r["network"] == network]
        cells = [
            f"{r['bf16_vs_f32']['min_cosine']:.3f} / {r['bf16_vs_f32']['norm_ratio'][0]:.2f}-"
            f"{r['bf16_vs_f32']['norm_ratio'][1]:.2f}"
            for r in mine
        ]
        ok = [r["sigma"] for r in mine if r["bf16_ok"]]
        print(f"| {network} | " + " | ".join(cells) + f" | {min(ok) if ok else 'none'} |")


if __name__ == "__main__":
    main()
