"""The README's results section, generated from a committed report's JSON.

    python -m magneto.report.readme bench/results/report-cpu-float32-<date>.json    # print it
    python -m magneto.report.readme bench/results/report-cpu-float32-<date>.json --readme README.md

With ``--readme`` the block between ``<!-- report:<device>-<dtype>:start -->`` and
``<!-- report:<device>-<dtype>:end -->`` is replaced (the markers stay), so that the README shows
the latest committed report of each device and dtype without a number typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from magneto.report.harness import markdown_table
from magneto.report.render import comparators_of, ratio_cell


def _worst_parity(rows: list[dict]) -> list[list]:
    worst: dict[tuple, list] = {}
    for r in rows:
        if r["backend"] == "reference":
            continue
        key = (r["op"], r["backend"], r["dtype"])
        cur = worst.setdefault(key, [0.0, 0.0, True])
        cur[0] = max(cur[0], r["output"]["rel_err"])
        cur[1] = max(cur[1], r["grads"]["rel_err"])
        cur[2] = cur[2] and r["output"]["ok"] and r["grads"]["ok"]
    return [
        [op, be, dt, f"{o:.1e}", f"{g:.1e}", "yes" if ok else "**no**"]
        for (op, be, dt), (o, g, ok) in worst.items()
    ]


def section(report: dict, json_path: str) -> str:
    m, st = report["machine"], report["settings"]
    sizes = st["sizes"]
    threads = f"{m['threads']} thread{'s' if m['threads'] > 1 else ''}"
    lines = [
        f"Measured {m['date']} on {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs, "
        f"{threads}, kernels for {m.get('kernel_isa')}, GEMM engine "
        f"{m.get('cpu_gemm_engine')}; torch {m['torch']}, triton {m['triton']}), "
        f"{st['dtype']}, d={sizes['d']}, {sizes['heads']} heads, FFN {sizes['ffn']}, "
        f"{sizes['batch']}×{sizes['tokens']} tokens, {st['rounds']} interleaved rounds "
        f"({st['clock']}), in {report['runtime_s']:.0f} s. Command: `{report['command']}`; "
        f"full report: [{os.path.basename(json_path)[:-5]}.md]"
        f"({os.path.splitext(json_path)[0]}.md).",
        "",
    ]
    layers = [r for r in report.get("speed", []) if r["group"] == "layers"]
    if layers:
        comparators = comparators_of(layers)
        lines += ["time(magneto) / time(X), median (min–max) over rounds; below 1 is faster:", ""]
        lines += markdown_table(
            ["layer", "pass", "backend", "ms", *[f"/ {c}" for c in comparators]],
            [
                [
                    r["case"],
                    r["pass"],
                    be,
                    1e3 * r["times"][f"magneto {be}"]["median_s"],
                    *[ratio_cell(ratios.get(c)) for c in comparators],
                ]
                for r in layers
                for be, ratios in r["ratios"].items()
            ],
        ) + [""]
    if report.get("goals"):
        lines += markdown_table(
            ["speed goal (layer fwd+bwd)", "backend", "ratio", "bound", "holds"],
            [
                [
                    f"{g['case']} / {g['comparator']}",
                    g["backend"],
                    g["median"],
                    f"≤ {g['bound']:.3f}",
                    {True: "yes", False: "**no**", None: "not measured"}[g["holds"]],
                ]
                for g in report["goals"]
            ],
        ) + [""]
    if report.get("parity_ops"):
        lines += ["Parity against float64, worst norm-wise relative error over the cases:", ""]
        lines += markdown_table(
            ["op", "backend", "dtype", "output", "gradients", "within bounds"],
            _worst_parity(report["parity_ops"]),
        ) + [""]
    if report.get("parity_models"):
        worst = max(
            max(r["output_rel_err"], r["grad_rel_err"] or 0.0) for r in report["parity_models"]
        )
        lines += [
            f"Whole models against torchscale 0.3.0 (encoder, decoder, encoder-decoder; "
            f"Sub-LN, DeepNorm, Pre-LN; token-by-token decoding): worst relative error "
            f"{worst:.1e}.",
            "",
        ]
    if report.get("memory"):
        lines += markdown_table(
            ["saved for backward per token", "d-vectors"],
            [
                [f"{r['layer']} layer, {r['model']}", r["d_vectors_per_token"]]
                for r in report["memory"]
            ],
        ) + [""]
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block between the markers of ``name`` (``<device>-<dtype>``) replaced."""
    start, end = f"<!-- report:{name}:start -->", f"<!-- report:{name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} block to replace")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m magneto.report.readme", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "json", help="a report's JSON (bench/results/report-<device>-<dtype>-<date>.json)"
    )
    p.add_argument("--readme", help="README to update in place (between the report markers)")
    args = p.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    body = section(report, args.json)
    if args.readme is None:
        print(body)
        return 0
    with open(args.readme) as f:
        text = f.read()
    try:
        settings = report["settings"]
        text = replace_block(text, f"{settings['device']}-{settings['dtype']}", body)
    except ValueError as err:
        p.error(f"--readme {args.readme}: {err}")
    with open(args.readme, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
