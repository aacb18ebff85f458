"""The learning-rate sweep of ``magneto.examples.stability``: its plan, its store and its runner.

Plan. The first pass trains every scheme x depth x learning rate x warm-up with seed 0. The
second pass reruns, with seeds 1 .. ``--seeds``-1, the two learning rates on either side of each
(scheme, depth, warm-up)'s divergence edge as the first pass found it: the last rate that did
not diverge and the first that did, going up from the lowest that did not (only the lowest rate
when every rate diverged, only the highest when none did).

Store. ``stability-runs.jsonl``: one JSON object per finished run, appended (and flushed) as the
run ends, holding the shared ``setup``, the ``run`` (scheme, layers, lr, warmup, seed) and its
results (``stability.train_run``). A run is done when a line with the same setup and run exists;
lines of other setups stay in the file and are ignored, so changing a shared setting starts a
new sweep beside the old one. A line cut short by a killed process is skipped (and rerun).

Runner. ``--jobs`` worker processes (spawned, ``--threads`` torch threads each) take the runs,
longest first; the parent writes the store and draws the progress bar, whose unit is the
layer-step (a run's cost is its depth times its steps, so the time left is estimated from
work, not from run counts; a run that diverges early counts its full cost).

Sizing of the full sweep (``FULL`` in ``magneto.examples.stability``), from process time (CPU
time of the run's own process, so the load of a shared machine does not count, though its
contention for caches and cores still slows each step). One training step of the default model
(width 64, 4 heads, FFN 256, batch 8 x 64 bytes) took 4.2 ms per layer with one torch thread
at depths 16 and 64 (Post-LN and Sub-LN alike) and 5.3 ms in the sweep's own first runs at depth
128 (on this project's 2-core x86_64 machine, shared with six other jobs). The first pass is
5 schemes x 9 rates x 2 warm-ups = 90 runs per depth of 120 steps: 90 x (8 + 32 + 128) x 120 =
1.81M layer-steps; the second pass at most 2 rates x 5 schemes x 2 warm-ups = 20 runs per depth,
0.40M, of which half diverge and stop early. At 5.3 ms per layer-step that is at most 3.3
core-hours; runs that diverge (every scheme at the top rates; Post-LN at depth) stop after
about a third of their steps, which brings the measured total to the figure in stability.md:
under 3 core-hours, 90 minutes on 2 idle cores with ``--jobs 2``.
"""

import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from itertools import product
from pathlib import Path

import torch

from magneto.examples import stability, stability_report
from magneto.examples.stability import Data, Run, setup_of, train_run

RUNS_FILE = "stability-runs.jsonl"


def first_pass(args):
    """Every scheme x depth x learning rate x warm-up, seed 0."""
    return [
        Run(scheme, layers, lr, warmup, 0)
        for scheme, layers, lr, warmup in product(args.schemes, args.depths, args.lrs, args.warmups)
    ]


def edge_lrs(diverged):
    """The learning rates next to the divergence edge, from ``{lr: diverged}`` of one line."""
    lrs = sorted(diverged)
    stable = [i for i, lr in enumerate(lrs) if not diverged[lr]]
    if not stable:
        return [lrs[0]]
    above = [i for i in range(stable[0], len(lrs)) if diverged[lrs[i]]]
    if not above:
        return [lrs[-1]]
    return [lrs[above[0] - 1], lrs[above[0]]]


def second_pass(args, records):
    """Seeds 1 .. args.seeds-1 at the rates next to each line's edge (see the module docstring)."""
    runs = []
    for scheme, layers, warmup in product(args.schemes, args.depths, args.warmups):
        first = {lr: records.get(Run(scheme, layers, lr, warmup, 0)) for lr in args.lrs}
        if any(record is None for record in first.values()):
            continue  # the first pass is not complete (--replot of a partial sweep)
        for lr in edge_lrs({lr: record["diverged"] for lr, record in first.items()}):
            runs += [Run(scheme, layers, lr, warmup, seed) for seed in range(1, args.seeds)]
    return runs


def load_records(path, setup):
    """``{Run: record}`` of the finished runs of ``setup`` in the store at ``path``."""
    records = {}
    if not Path(path).exists():
        return records
    wanted = asdict(setup)
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a killed process: the run is redone
        if record.get("setup") == wanted:
            records[Run(**record["run"])] = record
    return records


def append_record(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def cost(run, setup):
    """A run's work in layer-steps (its time is about proportional to it)."""
    return run.layers * setup.steps


_WORKER = {}


def _start_worker(setup, threads):
    # A run thrown off by a high learning rate fills its tensors with subnormal floats, which x86
    # cores process many times slower (README, Training stability); flushing them to zero changes
    # nothing the sweep measures.
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    _WORKER["data"] = Data.load(setup)


def _train(run, setup):
    return train_run(run, setup, _WORKER["data"])


def execute(runs, args, path, desc):
    """Train the runs of ``runs`` not yet in the store, appending each as it ends."""
    from tqdm import tqdm

    setup = setup_of(args)
    done = load_records(path, setup)
    todo = sorted((r for r in runs if r not in done), key=lambda r: -cost(r, setup))
    if not todo:
        return
    bar = tqdm(
        total=sum(cost(r, setup) for r in todo),
        desc=f"{desc}: {len(todo)} runs",
        unit="layer-step",
        unit_scale=True,
        dynamic_ncols=True,
        file=sys.stderr,
    )

    def finish(run, results):
        append_record(path, {"setup": asdict(setup), "run": asdict(run), **results})
        bar.update(cost(run, setup))
        verdict = f"diverged at {results['diverged_step']}" if results["diverged"] else "ok"
        bar.set_postfix_str(
            f"{stability.LABELS[run.scheme]} L{run.layers} lr {run.lr:g} w{run.warmup} "
            f"s{run.seed}: {results['final_loss'] or math.nan:.3f} {verdict}"
        )

    if args.jobs == 1:
        threads = torch.get_num_threads()
        _start_worker(setup, args.threads)
        try:
            for run in todo:
                finish(run, _train(run, setup))
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)  # torch's default
    else:
        with ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(setup, args.threads),
        ) as pool:
            futures = {pool.submit(_train, run, setup): run for run in todo}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    bar.close()


def main(args, command):
    """Run (or, with --replot, only report) the sweep described by ``args``."""
    setup = setup_of(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUNS_FILE
    if not args.replot:
        first = first_pass(args)
        total = sum(cost(r, setup) for r in first)
        print(
            f"first pass: {len(first)} runs, {total:,} layer-steps; then up to "
            f"{2 * (args.seeds - 1) * len(first) // len(args.lrs)} runs at the edges. "
            f"Finished runs go to {path} as they end; rerunning this command resumes.",
            file=sys.stderr,
        )
        execute(first, args, path, "first pass")
        execute(second_pass(args, load_records(path, setup)), args, path, "edges")
    records = load_records(path, setup)
    if not records:
        raise SystemExit(f"no runs of this setup in {path}")
    written = stability_report.write(records, args, command, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return records
