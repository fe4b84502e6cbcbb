"""The README-ready markdown table of one benchmarks/gpu_suite.py run, from its JSON rows."""

from __future__ import annotations


def loop_table(rows: list[dict]) -> str:
    """benchmarks/loop_overhead.py's rows as markdown (also its own output)."""
    lines = [
        "| batch | loop | trainer epoch (s) | pure steps (s) | host µs/step | overhead |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batchsize']} | {r['loop']} | {r['trainer_epoch_s']:.3f} | "
            f"{r['pure_epoch_s']:.3f} | {r['host_us_per_step']:.0f} | {100 * r['overhead']:+.1f}% |"
        )
    return "\n".join(lines)


def _pairs(rows, section):
    """(network, dtype, batch) -> {variant: row} of a steps-like section, in measured order."""
    out = {}
    for r in rows:
        if r["section"] == section and "variant" in r:
            out.setdefault((r["network"], r["dtype"], r["batchsize"]), {})[r["variant"]] = r
    return out


def table(rows, command):
    """The README-ready markdown of one run's rows."""
    kind, date = rows[0]["device_kind"], rows[0]["date"]
    md = [f"### GPU suite: {kind}, {date}", "", f"`{command}`", ""]
    md += [
        "TF32 floor check: NP's mean at the device's default precision vs `highest`, same "
        "noise (cosine >= 0.99, norm within 15%).",
        "",
        "| network | sigma | at floor | min cosine | norm ratio | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] == "precision" and "skipped" not in r:
            md.append(
                f"| {r['network']} | {r['sigma']:g} | {r['at_floor']} | "
                f"{r['min_cosine']:.4f} | {r['norm_ratio'][0]:.3f}-{r['norm_ratio'][1]:.3f}"
                f" | {r['ok']} |"
            )
    peaks = {r["dtype"]: r["gflop_s"] for r in rows if r["section"] == "peak"}
    md += [
        "",
        "Matmul peak (MFU's reference): "
        + ", ".join(f"{d} {g / 1e3:.3g} TFLOP/s" for d, g in peaks.items()),
        "",
    ]
    loops = [r for r in rows if r["section"] == "loop" and "skipped" not in r]
    md += [
        "Train loop (fc NP, benchmarks/loop_overhead.py): its epoch time vs its compiled steps "
        "on a resident batch; before: a metrics read per step; after: the defaults; k4: "
        "--steps_per_call=4.",
        "",
        loop_table(loops) if loops else "(none measured)",
    ]
    pairs = _pairs(rows, "steps")
    shape = "x".join(map(str, next(iter(pairs.values()))["sgd"]["input"])) if pairs else "-"
    md += [
        "",
        f"NP (Rademacher) vs SGD, one device, {shape} input, "
        + ("tiny nets (a --quick smoke run)" if rows[0]["quick"] else "full width")
        + ". MB: XLA's peak temp memory; MFU: achieved FLOP/s (XLA's cost analysis) over the "
        "measured matmul peak of the same dtype (float32 at `highest`, the steps' precision).",
        "",
        "| network | dtype | batch | SGD ms | NP ms | NP/SGD | SGD MB | NP MB | NP MB/SGD | "
        "SGD MFU | NP MFU | NP compile s |",
        "|---" * 12 + "|",
    ]
    for (network, dtype, b), v in pairs.items():
        s, n = v["sgd"], v["np-rademacher"]
        md.append(
            f"| {network} | {dtype} | {b} | {s['step_ms']:.2f} | {n['step_ms']:.2f} | "
            f"{n['time_vs_first']:.2f} | {s['temp_mb']:.1f} | {n['temp_mb']:.1f} | "
            f"{n['temp_vs_first']:.2f} | {100 * s['mfu']:.1f}% | {100 * n['mfu']:.1f}% | "
            f"{n['compile_s']:.1f} |"
        )
    md += [
        "",
        "Noise kinds (NP, float32):",
        "",
        "| network | batch | Rademacher ms | Gaussian ms | Gaussian/Rademacher |",
        "|---|---|---|---|---|",
    ]
    for (network, _, b), v in _pairs(rows, "noise").items():
        md.append(
            f"| {network} | {b} | {v['np-rademacher']['step_ms']:.2f} | "
            f"{v['np-gaussian']['step_ms']:.2f} | {v['np-gaussian']['time_vs_first']:.2f} |"
        )
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        md += [
            "",
            "Not measured: "
            + "; ".join(
                " ".join(
                    [r["section"]]
                    + [
                        str(r[k])
                        for k in ("network", "dtype", "batchsize", "loop", "sigma", "members")
                        if k in r
                    ]
                )
                + f" ({r['skipped']})"
                for r in skipped
            )
            + ".",
        ]
    md += [
        "",
        "Population (fc NP, lr members, one device): one step of N members against N solo steps.",
        "",
        "| members | batch | step ms | solo step ms | speed-up vs sequential | MB per member |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] == "population" and "skipped" not in r:
            md.append(
                f"| {r['members']} | {r['batchsize']} | {r['step_ms']:.2f} | "
                f"{r['solo_step_ms']:.2f} | {r['speedup_vs_sequential']:.2f} | "
                f"{r['mb_per_member']:.2f} |"
            )
    md.append("")
    return "\n".join(md)
