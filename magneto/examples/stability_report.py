"""Figures and tables of a learning-rate sweep (``magneto.examples.stability``).

A *line* is one (scheme, depth, warm-up): its runs over the learning rates, one or more seeds
each. A run's *effective loss* is its final validation loss capped at its initial loss, and the
initial loss when it diverged (Wortsman et al. 2023: a run that ends worse than it started
counts as the start). Per learning rate the effective losses of the seeds are averaged.

- LR sensitivity (Wortsman et al.): the mean over the swept rates of the effective loss minus the
  best (lowest) of them. 0 means every rate trains as well as the best; a line that fails at
  most rates approaches initial loss minus best loss.
- Stable rates: those at which no seed diverged.
- Rates that learn: those at which every seed ends at least ``LEARN_MARGIN`` below the unigram
  baseline (the loss of byte frequencies alone, no context). A run can fail without diverging: a
  deep Post-LN model settles at that baseline and stays there, which the divergence rule does not
  catch; the margin keeps a run that sits a hair under the baseline (3.09 against 3.11) from
  counting as one that uses context.
"""

import math
import platform
import textwrap
from collections import defaultdict

import torch

from magneto.examples.stability import LABELS, SCHEMES, Data, setup_of

LEARN_MARGIN = 0.1  # nats per byte below the unigram baseline that count as learning


def effective_loss(record):
    """A run's final validation loss, capped at its initial loss (the initial loss if diverged)."""
    if record["diverged"] or record["final_loss"] is None:
        return record["initial_loss"]
    return min(record["final_loss"], record["initial_loss"])


def lines(records):
    """``{(scheme, layers, warmup): {lr: [record, ...]}}`` (records in seed order)."""
    grouped = defaultdict(lambda: defaultdict(list))
    for run in sorted(records, key=lambda r: r.seed):
        grouped[run.scheme, run.layers, run.warmup][run.lr].append(records[run])
    return grouped


def summarise(by_lr, lrs, unigram):
    """One line's numbers over the rates ``lrs`` (those with no run are left out)."""
    swept = [lr for lr in sorted(lrs) if by_lr.get(lr)]
    losses = {lr: sum(map(effective_loss, by_lr[lr])) / len(by_lr[lr]) for lr in swept}
    diverged = {lr: any(r["diverged"] for r in by_lr[lr]) for lr in swept}
    best = min(losses, key=losses.get) if losses else None
    return {
        "losses": losses,
        "diverged": diverged,
        "stable": [lr for lr in swept if not diverged[lr]],
        "learns": [
            lr
            for lr in swept
            if all(effective_loss(r) <= unigram - LEARN_MARGIN for r in by_lr[lr])
        ],
        "initial": max((r["initial_loss"] for lr in swept for r in by_lr[lr]), default=math.nan),
        "best_lr": best,
        "best_loss": losses[best] if losses else math.nan,
        "sensitivity": (sum(losses.values()) / len(losses) - losses[best]) if losses else math.nan,
        "seeds": {lr: len(by_lr[lr]) for lr in swept},
    }


def rate_range(rates, summary):
    """Rates as text: 'a – b' when contiguous among the line's swept rates, else a list."""
    if not rates:
        return "none"
    grid = list(summary["losses"])  # the swept rates, ascending
    first, last = grid.index(rates[0]), grid.index(rates[-1])
    if len(rates) == last - first + 1:
        return f"{rates[0]:g} – {rates[-1]:g}" if len(rates) > 1 else f"{rates[0]:g}"
    return ", ".join(f"{lr:g}" for lr in rates)


def _warmup_title(warmup):
    return "no warm-up" if warmup == 0 else f"warm-up {warmup} steps"


def plot_losses(summaries, args, unigram, path, title):
    """Final loss against learning rate: a panel per depth (columns) and warm-up (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(args.warmups), len(args.depths)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.6 * rows), sharex=True, sharey=True, squeeze=False
    )
    initials, finals = [], []
    for (row, warmup), (col, layers) in product_enumerate(args.warmups, args.depths):
        ax = axes[row][col]
        for i, scheme in enumerate(s for s in SCHEMES if s in args.schemes):
            summary = summaries.get((scheme, layers, warmup))
            if not summary or not summary["losses"]:
                continue
            lrs = list(summary["losses"])
            losses = [summary["losses"][lr] for lr in lrs]
            finals += losses
            ax.plot(lrs, losses, "-", color=f"C{i}", label=LABELS[scheme], linewidth=1.5)
            for lr, loss in zip(lrs, losses):
                bad = summary["diverged"][lr]
                ax.plot(
                    lr,
                    loss,
                    "x" if bad else "o",
                    color=f"C{i}",
                    markersize=9 if bad else 4,
                    markeredgewidth=2 if bad else 1,
                )
            initials += [summary["initial"]]
        ax.axhline(unigram, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(f"depth {layers}, {_warmup_title(warmup)}", fontsize=10)
        ax.grid(alpha=0.3)
        if row == rows - 1:
            ax.set_xlabel("peak learning rate (Adam)")
        if col == 0:
            ax.set_ylabel("final validation loss (nats/byte)")
    if finals:
        axes[0][0].set_ylim(min(finals) - 0.1, max(initials) + 0.15)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="gray", linestyle="--"))
    labels.append("unigram baseline (no context)")
    handles.append(plt.Line2D([], [], color="black", marker="x", linestyle="", markersize=8))
    labels.append("diverged (drawn at its initial loss)")
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.suptitle(_wrap(title, 40 * cols), fontsize=9)
    fig.tight_layout(rect=(0, 0.1 / rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(summaries, args, path, title):
    """LR sensitivity against depth, a line per scheme, a panel per warm-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(args.warmups)
    fig, axes = plt.subplots(1, cols, figsize=(5 * cols, 3.8), sharey=True, squeeze=False)
    for col, warmup in enumerate(args.warmups):
        ax = axes[0][col]
        for i, scheme in enumerate(s for s in SCHEMES if s in args.schemes):
            points = [
                (layers, summaries[scheme, layers, warmup]["sensitivity"])
                for layers in args.depths
                if (scheme, layers, warmup) in summaries
            ]
            if points:
                ax.plot(*zip(*points), "o-", color=f"C{i}", label=LABELS[scheme])
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.depths, [str(d) for d in args.depths])
        ax.set_xlabel("depth (decoder layers)")
        ax.set_title(_warmup_title(warmup), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("LR sensitivity (nats)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_wrap(title, 48 * cols), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(title, width):
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def product_enumerate(a, b):
    """Pairs ((i, a_i), (j, b_j)) over both lists."""
    return [(x, y) for x in enumerate(a) for y in enumerate(b)]


def describe(args):
    """One line stating the setup."""
    return (
        f"width {args.width}, {args.heads} heads, FFN {args.ffn_dim}; batch {args.batch_size}x"
        f"{args.seq_len} bytes; {args.steps} steps of Adam (linear warm-up, cosine to 0.1x); "
        f"depths {args.depths}; rates {[f'{lr:g}' for lr in args.lrs]}; "
        f"warm-ups {args.warmups}; {args.seeds} seed(s) at the edges"
    )


def _cell(records):
    """One table cell: each seed's final loss, or where it diverged."""
    return " / ".join(
        f"div@{r['diverged_step']}" if r["diverged"] else f"{r['final_loss']:.3f}" for r in records
    )


def _number(value):
    return "—" if value is None else f"{value:.3g}"


def tables(summaries, by_line, args):
    """The markdown tables: stable ranges, sensitivity, per-run losses, update size."""
    schemes = [s for s in SCHEMES if s in args.schemes]
    head = "| scheme | " + " | ".join(f"depth {d}" for d in args.depths) + " |"
    rule = "|---|" + "---:|" * len(args.depths)
    out = []
    for warmup in args.warmups:
        out += [f"\n### Learning rates, {_warmup_title(warmup)}\n"]
        out += [
            f"(stable: no seed diverged; learns: every seed ends at least {LEARN_MARGIN} nats "
            "below the unigram baseline; best: the rate of the lowest loss, and that loss)\n",
            head,
            rule,
        ]
        for scheme in schemes:
            cells = []
            for layers in args.depths:
                s = summaries.get((scheme, layers, warmup))
                cells.append(
                    f"stable {rate_range(s['stable'], s)}; learns {rate_range(s['learns'], s)}; "
                    f"best {s['best_lr']:g} ({s['best_loss']:.3f})"
                    if s and s["losses"]
                    else "not run"
                )
            out.append(f"| {LABELS[scheme]} | " + " | ".join(cells) + " |")
    out += ["\n### LR sensitivity (nats; lower is more stable)\n"]
    out += ["| scheme | warm-up | " + head[len("| scheme | ") :], "|---|---:|" + rule[5:]]
    for scheme, warmup in ((s, w) for s in schemes for w in args.warmups):
        cells = [
            f"{summaries[scheme, d, warmup]['sensitivity']:.3f}"
            if (scheme, d, warmup) in summaries
            else "—"
            for d in args.depths
        ]
        out.append(f"| {LABELS[scheme]} | {warmup} | " + " | ".join(cells) + " |")
    lr_head = "| scheme | " + " | ".join(f"{lr:g}" for lr in sorted(args.lrs)) + " |"
    lr_rule = "|---|" + "---:|" * len(args.lrs)
    for warmup, layers in ((w, d) for w in args.warmups for d in args.depths):
        out += [f"\n### Final validation loss, depth {layers}, {_warmup_title(warmup)}\n"]
        out += ["(per seed; div@N: diverged at step N)\n", lr_head, lr_rule]
        for scheme in schemes:
            by_lr = by_line.get((scheme, layers, warmup), {})
            cells = [_cell(by_lr[lr]) if by_lr.get(lr) else "—" for lr in sorted(args.lrs)]
            out.append(f"| {LABELS[scheme]} | " + " | ".join(cells) + " |")
    probe, warmup = min(args.lrs, key=lambda lr: abs(math.log(lr / 1e-3))), min(args.warmups)
    out += [
        f"\n### First-step update size / largest gradient norm at lr {probe:g}, "
        f"{_warmup_title(warmup)} (seed 0)\n",
        "(update size: DeepNet's ‖ΔF‖/‖F‖ of the logits after the first optimizer step)\n",
        head,
        rule,
    ]
    for scheme in schemes:
        cells = []
        for layers in args.depths:
            records = by_line.get((scheme, layers, warmup), {}).get(probe)
            r = records[0] if records else None
            cells.append(
                f"{_number(r['first_update'])} / {_number(r['max_grad_norm'])}" if r else "—"
            )
        out.append(f"| {LABELS[scheme]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write(records, args, command, out):
    """stability.png, stability-sensitivity.png and stability.md in ``out``; returns the paths."""
    setup = setup_of(args)
    unigram = Data.load(setup).unigram
    by_line = lines(records)
    summaries = {key: summarise(by_lr, args.lrs, unigram) for key, by_lr in by_line.items()}
    title = f"{describe(args)}\n{command}"
    paths = [out / "stability.png", out / "stability-sensitivity.png", out / "stability.md"]
    plot_losses(summaries, args, unigram, paths[0], title)
    plot_sensitivity(summaries, args, paths[1], title)
    cpu_minutes = sum(r["cpu_seconds"] for r in records.values()) / 60
    parameters = {
        (run.scheme, run.layers): r["parameters"] for run, r in records.items() if run.seed == 0
    }
    sizes = ", ".join(
        f"depth {d}: {parameters[s, d]:,}"
        for s, d in sorted(parameters, key=lambda k: k[1])
        if s == "subln"
    )
    environment = (
        f"Python {platform.python_version()} stdlib, torch {torch.__version__}, "
        f"{args.threads} thread(s) per job, {platform.processor() or platform.machine()}"
    )
    text = (
        f"# Training stability: learning-rate sensitivity across depth\n\n`{command}`\n\n"
        f"{describe(args)}. {environment}. {len(records)} runs, {cpu_minutes:.0f} core-minutes of "
        f"process time. Magneto's parameters ({sizes}). Unigram baseline (byte frequencies, "
        f"no context) on the validation windows: {unigram:.3f} nats/byte.\n\n"
        "![final loss against learning rate](stability.png)\n\n"
        "![LR sensitivity against depth](stability-sensitivity.png)\n"
        f"{tables(summaries, by_line, args)}\n"
    )
    paths[2].write_text(text)
    return paths
