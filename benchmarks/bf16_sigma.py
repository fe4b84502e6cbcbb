"""The bfloat16 and TF32 sigma floors: the smallest NP noise scale whose mean stays unbiased.

For each network (small widths, 8x8x3 inputs, batch 32, cross-entropy; `--input`, `--hl_size`,
`--width` change them) and each sigma of a grid, `--draws` NP estimates run in bf16 (or, with
`--compute=tf32`, in float32 with every matmul and conv in emulated TF32, a GPU's
--precision=default: precision.emulate_tf32) and, with the very same noise, in float32. Reported per
sigma: the worst per-leaf cosine and norm ratio of the bf16 mean against the float32 mean (the
noise's own variance cancels in this paired comparison, so what is left is what bf16 changes),
and of the float32 mean against jax.grad (the finite-sigma bias, and the variance left after
this many draws). Below the floor bf16 rounds the noise away at the taps (|a| ~ 1 has a 2^-8
spacing) and in the loss change, and the estimate shrinks and turns. The floors go into
precision.BF16_SIGMA_FLOOR, the table into docs/results/bf16_sigma.md; tests/test_estimator.py
checks the floor with the unpaired Monte-Carlo test.

    python benchmarks/bf16_sigma.py --networks=fc,conv,vgg,resnet --draws=4000
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from nodepert_dist import cli, files, losses, models, perturbation, precision

BATCH = 32


def mean_estimates(models_, params, x, y, sigma, draws, tf32=(), moments=False):
    """The mean NP estimate of each model (same parameters, same noise draws); the i-th in
    emulated TF32 if i is in `tf32`. `moments`: also each one's mean squared norm per leaf."""

    def estimate(m, step):
        keys = perturbation.example_keys(0, step, jnp.arange(BATCH))
        return perturbation.np_gradient(
            m, params, x.astype(m.dtype), y, losses.ce, sigma=sigma, keys=keys, normalizer=BATCH
        )[0]

    def one(step):
        return [
            precision.emulate_tf32(lambda s, m=m: estimate(m, s))(step)
            if i in tf32
            else estimate(m, step)
            for i, m in enumerate(models_)
        ]

    def add(i, acc):
        ests = one(i)
        squares = [jax.tree.map(lambda g: jnp.sum(g * g), e) for e in ests]
        return jax.tree.map(jnp.add, acc, (ests, squares))

    zero = [jax.tree.map(jnp.zeros_like, params) for _ in models_]
    sq_zero = [jax.tree.map(lambda p: jnp.zeros((), p.dtype), params) for _ in models_]
    total = jax.jit(lambda: jax.lax.fori_loop(0, draws, add, (zero, sq_zero)))()
    means, squares = jax.tree.map(lambda a: a / draws, total)
    return (means, squares) if moments else means


def _keys_like(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(2), len(leaves))))


def worst(mean, true):
    cos = [
        float(jnp.vdot(u, v, precision="highest") / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
        for u, v in zip(jax.tree.leaves(mean), jax.tree.leaves(true))
    ]
    ratio = [
        float(jnp.linalg.norm(u) / jnp.linalg.norm(v))
        for u, v in zip(jax.tree.leaves(mean), jax.tree.leaves(true))
    ]
    return min(cos), min(ratio), max(ratio)


def comma_list(kind):
    """argparse type of a comma list whose items `kind` checks (a bad item: one-line error);
    also benchmarks/gpu_suite.py's."""

    def parse(text):
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def network_name(name):
    if name not in models.NETWORKS:
        raise ValueError(f"{name!r} is not one of {', '.join(models.NETWORKS)}")
    return name


def main():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="fc,conv,vgg,resnet", type=comma_list(network_name))
    parser.add_argument("--sigmas", default="1e-3,3e-3,1e-2,3e-2,1e-1", type=comma_list(float))
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--compute", default="bf16", choices=("bf16", "tf32"))
    parser.add_argument("--input", default="8,8,3", type=comma_list(int), help="H,W,C")
    parser.add_argument("--hl_size", type=int, default=32, help="fc/linfc units per layer")
    parser.add_argument("--width", type=int, default=2, help="vgg/resnet first-stage channels")
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/<compute>_sigma.json"
    )
    args = parser.parse_args()
    low = args.compute  # the low-precision side of the comparison
    x = jax.random.normal(jax.random.key(1), (BATCH, *args.input))
    y = jnp.arange(BATCH) % 10
    rows = []
    for network in args.networks:
        base = models.build_model(network, 10, n_hl=2, hl_size=args.hl_size, width=args.width)
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
            other = base.clone(dtype=jnp.bfloat16) if low == "bf16" else base
            (f32, lowp), (sq32, sqlow) = mean_estimates(
                [base, other],
                params,
                x,
                y,
                sigma,
                args.draws,
                tf32=(1,) if low == "tf32" else (),
                moments=True,
            )
            row = dict(network=network, sigma=sigma, draws=args.draws, input=args.input)
            # The estimator's second moment against float32's, worst leaf: the variance the
            # rounding adds (it does not cancel in a mean of few draws, unlike the noise's own).
            ratios = [float(a / b) for a, b in zip(jax.tree.leaves(sqlow), jax.tree.leaves(sq32))]
            row["second_moment_ratio"] = [round(min(ratios), 3), round(max(ratios), 3)]
            row[f"{low}_vs_grad"] = dict(min_cosine=round(worst(lowp, true)[0], 4))
            for name, (a, b) in {f"{low}_vs_f32": (lowp, f32), "f32_vs_grad": (f32, true)}.items():
                cos, lo, hi = worst(a, b)
                row[name] = dict(min_cosine=round(cos, 4), norm_ratio=[round(lo, 3), round(hi, 3)])
            c = row[f"{low}_vs_f32"]
            # The mean itself (bf16 shrinks and turns it below the floor) and, for TF32, which
            # adds variance first, at most 10% more second moment on every leaf.
            row[f"{low}_ok"] = (
                c["min_cosine"] >= 0.99
                and 0.85 <= c["norm_ratio"][0]
                and c["norm_ratio"][1] <= 1.15
                and (low == "bf16" or row["second_moment_ratio"][1] <= 1.1)
            )
            rows.append(row)
            print(json.dumps(row), f"({time.time() - t:.0f} s)", flush=True)
    files.write_json(args.out or f"benchmarks/results/{low}_sigma.json", rows)
    print(
        f"\n{low} mean vs float32 mean, same noise: worst cosine / norm ratio range"
        + (" / largest second-moment ratio" if low == "tf32" else "")
    )
    print("| network | " + " | ".join(f"sigma {s}" for s in args.sigmas) + " | floor |")
    print("|---" * (len(args.sigmas) + 2) + "|")
    for network in args.networks:
        mine = [r for r in rows if r["network"] == network]
        cells = [
            f"{r[f'{low}_vs_f32']['min_cosine']:.3f} / {r[f'{low}_vs_f32']['norm_ratio'][0]:.2f}-"
            f"{r[f'{low}_vs_f32']['norm_ratio'][1]:.2f}"
            + (f" / m2 {r['second_moment_ratio'][1]:.2f}" if low == "tf32" else "")
            for r in mine
        ]
        ok = [r["sigma"] for r in mine if r[f"{low}_ok"]]
        print(f"| {network} | " + " | ".join(cells) + f" | {min(ok) if ok else 'none'} |")


if __name__ == "__main__":
    main()
