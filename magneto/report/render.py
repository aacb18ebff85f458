"""The report's markdown and plot, both generated from its JSON (nothing typed by hand)."""

from __future__ import annotations

from typing import Optional

from magneto.report import bitnet
from magneto.report.harness import markdown_table
from magneto.report.speed import (
    CASE_BUDGET_S,
    COMPILED,
    FLOOR_BYTES,
    FLOOR_ENGINE,
    FLOOR_MM,
    REFERENCE,
    TORCHSCALE,
)

# Comparator columns in this order; any other (a GPU library's LayerNorm) goes before the floors.
_ORDER = [REFERENCE, TORCHSCALE, COMPILED]
_FLOORS = [FLOOR_ENGINE, FLOOR_MM, FLOOR_BYTES]
_COLORS = {
    REFERENCE: "tab:blue",
    TORCHSCALE: "tab:orange",
    COMPILED: "tab:green",
    FLOOR_ENGINE: "tab:gray",
    FLOOR_MM: "tab:brown",
    FLOOR_BYTES: "tab:purple",
}

# The speed goals, as bounds on time(magneto) / time(comparator) for a layer's forward+backward.
CPU_GOALS = {FLOOR_ENGINE: 1.10, TORCHSCALE: 1.0, COMPILED: 1.0}
GPU_GOALS = {REFERENCE: 1 / 1.3, COMPILED: 1 / 1.15, TORCHSCALE: 1 / 1.5}


def comparators_of(records: list[dict]) -> list[str]:
    seen = []
    for r in records:
        for ratios in r["ratios"].values():
            seen += [v for v in ratios if v not in seen]
    extra = [v for v in seen if v not in _ORDER and v not in _FLOORS]
    return [v for v in _ORDER if v in seen] + extra + [v for v in _FLOORS if v in seen]


def ratio_cell(stats: Optional[dict]) -> Optional[str]:
    if stats is None:
        return None
    return f"{stats['median']:.3f} ({stats['lo']:.3f}–{stats['hi']:.3f})"


def _err(e: dict) -> str:
    mark = "" if e["ok"] else " **FAIL**"
    return f"{e['rel_err']:.1e} (≤ {e['rel_bound']:.0e}){mark}"


def _parity_ops(rows: list[dict]) -> list[str]:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["case"], r["dtype"], tuple(r["shape"]))
        table.setdefault(key, {})[r["backend"]] = f"{_err(r['output'])} / {_err(r['grads'])}"
    failed = [r for r in rows if not (r["output"]["ok"] and r["grads"]["ok"])]
    lines = [
        "## Parity: every op against float64",
        "",
        "Norm-wise relative error of the output / of the worst input gradient, with its "
        "bound: max(rtol·‖ref‖, 2·PyTorch's own error in that dtype) + atol "
        "(docs/design.md, Numerics and tolerances). Shape: rows × in_features "
        "(× out_features for ln_linear).",
        "",
    ]
    lines += markdown_table(
        ["op", "case", "dtype", "shape", *backends],
        [
            [
                op,
                case,
                dtype,
                "×".join(map(str, shape[: 2 if op != "ln_linear" else 3])),
                *[cells.get(b) for b in backends],
            ]
            for (op, case, dtype, shape), cells in table.items()
        ],
    )
    verdict = (
        f"All {len(rows)} within their bounds."
        if not failed
        else f"**{len(failed)} of {len(rows)} outside their bounds.**"
    )
    return lines + ["", verdict, ""]


def _parity_models(rows: list[dict]) -> list[str]:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    table: dict[tuple, dict] = {}
    for r in rows:
        grad = "—" if r["grad_rel_err"] is None else f"{r['grad_rel_err']:.1e}"
        mark = "" if r["ok"] else " **FAIL**"
        table.setdefault((r["model"], r["scheme"]), {})[r["backend"]] = (
            f"{r['output_rel_err']:.1e} / {grad}{mark}"
        )
    failed = sum(not r["ok"] for r in rows)
    lines = [
        "## Parity: whole models against torchscale 0.3.0",
        "",
        "fp32, same weights (moved off their init), relative error of the output / of the "
        "worst parameter gradient; bound 1e-5.",
        "",
    ]
    lines += markdown_table(
        ["model", "scheme", *backends],
        [[m, sch, *[c.get(b) for b in backends]] for (m, sch), c in table.items()],
    )
    verdict = (
        f"All {len(rows)} within 1e-5."
        if not failed
        else f"**{failed} of {len(rows)} above 1e-5.**"
    )
    if any(b not in cells for cells in table.values() for b in backends):
        verdict += " —: not run (the Triton interpreter checks the Sub-LN models only)."
    return lines + ["", verdict, ""]


_GROUP_TITLES = {
    "ops": "Speed: ops at training size",
    "layers": "Speed: one Sub-LN layer at training size",
    "decode": "Speed: decoding (no_grad, KV cache)",
}


def _speed(records: list[dict]) -> list[str]:
    lines = []
    for group, title in _GROUP_TITLES.items():
        group_records = [r for r in records if r["group"] == group]
        if not group_records:
            continue
        comparators = comparators_of(group_records)
        header = ["case", "pass", "backend", "ms", *[f"/ {c}" for c in comparators], "achieved"]
        rows = []
        for r in group_records:
            for be, ratios in r["ratios"].items():
                achieved = r["achieved"].get(be, {})
                rows.append(
                    [
                        r["case"],
                        r["pass"],
                        be,
                        1e3 * r["times"][f"magneto {be}"]["median_s"],
                        *[ratio_cell(ratios.get(c)) for c in comparators],
                        ", ".join(f"{v:.2f} {unit}" for unit, v in achieved.items()) or None,
                    ]
                )
        lines += [f"## {title}", ""] + markdown_table(header, rows) + [""]
    return lines


def _cut_rounds(report: dict) -> str:
    """The cases that ran fewer rounds than planned (their rounds took over the per-case budget
    of wall time, ``speed.CASE_BUDGET_S``), named with their count."""
    planned = report["settings"]["rounds"]
    cut = [
        f"{r['case']} {r['pass']} ({r['rounds']})"
        for r in report.get("speed", [])
        if r.get("rounds", planned) < planned
    ]
    if not cut:
        return ""
    return f"; fewer rounds where a case's rounds passed {CASE_BUDGET_S:.0f} s: " + ", ".join(cut)


def goals(report: dict) -> list[dict]:
    """The speed goals checked on this run's layer forward+backward records."""
    bounds = GPU_GOALS if report["settings"]["device"] == "cuda" else CPU_GOALS
    checked = []
    for r in report.get("speed", []):
        if r["group"] != "layers" or r["pass"] != "fwd+bwd":
            continue
        for be, ratios in r["ratios"].items():
            for comparator, bound in bounds.items():
                stats = ratios.get(comparator)
                checked.append(
                    {
                        "case": r["case"],
                        "backend": be,
                        "comparator": comparator,
                        "bound": bound,
                        "median": None if stats is None else stats["median"],
                        "holds": None if stats is None else stats["median"] <= bound,
                    }
                )
    return checked


def _goals(report: dict) -> list[str]:
    checked = goals(report)
    if not checked:
        return []
    lines = [
        "## Speed goals (layer forward+backward)",
        "",
        "time(magneto) / time(comparator), median over rounds, against its bound. The "
        "goals are stated for the default sizes"
        + (
            " (bf16, d=2048, T=2048)."
            if report["settings"]["device"] == "cuda"
            else " (fp32, d=768, 12 heads, FFN 3072, 4×256 tokens)."
        ),
        "",
    ]
    lines += markdown_table(
        ["case", "backend", "comparator", "ratio", "bound", "holds"],
        [
            [
                g["case"],
                g["backend"],
                g["comparator"],
                g["median"],
                f"≤ {g['bound']:.3f}",
                {True: "yes", False: "**no**", None: "not measured"}[g["holds"]],
            ]
            for g in checked
        ],
    )
    return lines + [""]


def _memory(rows: list[dict]) -> list[str]:
    lines = [
        "## Memory: saved for backward per token",
        "",
        "One Sub-LN layer in training; distinct storages counted once, parameters and "
        "input excluded; d-vectors = d elements of the layer's dtype.",
        "",
    ]
    lines += markdown_table(
        ["layer", "model", "bytes per token", "d-vectors per token"],
        [
            [r["layer"], r["model"], round(r["bytes_per_token"]), r["d_vectors_per_token"]]
            for r in rows
        ],
    )
    return lines + [""]


def _machine(report: dict) -> list[str]:
    m, st = report["machine"], report["settings"]
    rows = [
        ("date", m["date"]),
        ("CPU", f"{m['cpu']}, {m['cpus']} CPUs"),
        ("threads", m["threads"]),
        ("kernels built for", m.get("kernel_isa")),
        ("cpu backend GEMM engine", m.get("cpu_gemm_engine")),
        ("torch / triton / python", f"{m['torch']} / {m['triton']} / {m['python']}"),
    ]
    if "gpu" in m:
        rows.append(("GPU", f"{m['gpu']} (CUDA {m['cuda']})"))
    if "load_average" in m:
        rows.append(("load average at start (1/5/15 min)", " / ".join(map(str, m["load_average"]))))
    sizes = st["sizes"]
    rows += [
        ("device, dtype (speed)", f"{st['device']}, {st['dtype']}"),
        (
            "training size",
            f"d={sizes['d']}, {sizes['heads']} heads, FFN {sizes['ffn']}, "
            f"{sizes['batch']}×{sizes['tokens']} tokens",
        ),
        (
            "decode size",
            f"{', '.join(map(str, sizes['decode_rows']))} rows over "
            f"{sizes['context']} cached tokens",
        ),
        (
            "timing",
            f"{st['rounds']} interleaved rounds, {st['clock']}; ratio = median "
            "(min–max) over rounds of per-round time ratios" + _cut_rounds(report),
        ),
        ("runtime", f"{report['runtime_s']:.0f} s"),
    ]
    for name, why in st.get("comparators_missing", {}).items():
        rows.append((f"{name}", f"not measured: {why}"))
    return ["## Machine and settings", ""] + markdown_table(["", ""], rows) + [""]


def markdown(report: dict, png_name: Optional[str] = None) -> str:
    m = report["machine"]
    lines = [
        f"# magneto report: {report['settings']['device']}, {m['date']}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    lines += _machine(report)
    if "parity_ops" in report:
        lines += _parity_ops(report["parity_ops"])
    if "parity_models" in report:
        lines += _parity_models(report["parity_models"])
    if report.get("speed"):
        lines += [
            "Speed tables: `/ X` is time(magneto backend) / time(X) per round, median "
            "(min–max): below 1 is faster than X; against a floor it is at least 1 and "
            "its inverse is the achieved fraction of the floor.",
            "",
        ]
        if png_name:
            lines += [f"![ratios]({png_name})", ""]
        lines += _speed(report["speed"]) + _goals(report)
        compiled = [r["compile_s"] for r in report["speed"] if r["compile_s"] is not None]
        if compiled:
            lines += [
                f"torch.compile: {sum(compiled):.0f} s of compiling and first calls in "
                "all, excluded from every timing.",
                "",
            ]
    if "memory" in report:
        lines += _memory(report["memory"])
    if "bitnet" in report:
        lines += bitnet.markdown(report["bitnet"])
    return "\n".join(lines)


def plot(report: dict, path: str) -> bool:
    """Ratio bars per op and layer (one panel per group), the 1.0 line and the floors; False
    when matplotlib is missing or there is nothing to plot."""
    records = report.get("speed") or []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [g for g in _GROUP_TITLES if any(r["group"] == g for r in records)]
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        rs = [r for r in records if r["group"] == group]
        comparators = comparators_of(rs)
        width = 0.8 / max(1, len(comparators))
        bars = [(r, be, ratios) for r in rs for be, ratios in r["ratios"].items()]
        for i, c in enumerate(comparators):
            xs, med, err = [], [], [[], []]
            for j, (_, _, ratios) in enumerate(bars):
                if c in ratios:
                    s = ratios[c]
                    xs.append(j + (i - (len(comparators) - 1) / 2) * width)
                    med.append(s["median"])
                    err[0].append(s["median"] - s["lo"])
                    err[1].append(s["hi"] - s["median"])
            ax.bar(
                xs,
                med,
                width,
                yerr=err,
                capsize=2,
                label=f"/ {c}",
                color=_COLORS.get(c, f"C{4 + i}"),
                hatch="//" if c in _FLOORS else None,
            )
        labels = [f"{r['case']}\n{r['pass']} [{be}]" for r, be, _ in bars]
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(range(len(bars)), labels, fontsize=6, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("time(magneto) / time(X)")
        ax.set_title(_GROUP_TITLES[group], fontsize=10)
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(
        f"magneto, {report['settings']['device']}, {report['machine']['date']}: below "
        "1 = faster than X; floors (hatched) ≥ 1",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
