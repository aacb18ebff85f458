"""``python -m magneto.report``: parse the flags, run the sections, write md, json and png."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from typing import Optional

import torch

import magneto_kernels as mk
from magneto.report import bitnet, harness, memory, parity, render, speed
from magneto.report.models import import_torchscale

SECTIONS = ("parity", "models", "memory", "ops", "layers", "decode", "compile", "bitnet")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Default sizes per device: the sizes the speed goals are stated at, and --quick's tiny ones.
SIZES = {
    "cpu": speed.Sizes(
        d=768, heads=12, ffn=3072, batch=4, tokens=256, decode_rows=(1, 8, 64), context=256
    ),
    "cuda": speed.Sizes(
        d=2048, heads=16, ffn=8192, batch=4, tokens=2048, decode_rows=(1, 8, 64), context=2048
    ),
    "quick": speed.Sizes(
        d=64, heads=4, ffn=128, batch=2, tokens=16, decode_rows=(1, 4), context=16
    ),
}
ROUNDS = {"cpu": 15, "cuda": 10, "quick": 3}
# Parity sizes: rows, in_features, out_features; the Triton interpreter gets the tiny ones.
PARITY_SHAPE = (128, 256, 384)
TINY_PARITY_SHAPE = (16, 64, 48)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magneto.report",
        description="Parity and speed of magneto's kernels and layers on this machine: writes "
        "report-<device>-<dtype>-<date>.{md,json,png}.",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="dtype of the speed and memory sections (default: float32 on cpu, "
        "bfloat16 on cuda); parity always covers float32 and bfloat16",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        metavar="BACKEND",
        help="fused backends to check and time (default: every one available on the "
        "device; triton on CPU, under TRITON_INTERPRET=1, is checked in parity "
        "at tiny sizes and never timed)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help=f"sections to run, of {', '.join(SECTIONS)} "
        "(compile: torch.compile comparators in ops, layers and decode)",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        choices=SECTIONS,
        default=[],
        metavar="SECTION",
        help="sections to leave out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes and {ROUNDS['quick']} rounds: checks the report, the numbers mean little",
    )
    for name, what in (
        ("d", "model width"),
        ("heads", "attention heads"),
        ("ffn", "FFN width"),
        ("batch", "sequences at training size"),
        ("tokens", "tokens per sequence at training size"),
        ("context", "cached tokens per sequence when decoding"),
    ):
        p.add_argument(f"--{name}", type=int, help=what)
    p.add_argument(
        "--decode-rows",
        type=int,
        nargs="+",
        metavar="ROWS",
        help="rows (sequences, one new token each) of the decoding cases",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds per case")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); with 1 the clock is the process's "
        "CPU time, which other processes' load does not inflate (shared "
        "machines), with more it is wall time",
    )
    p.add_argument(
        "--out-dir",
        default=os.path.join("bench", "results"),
        help="where the md, json and png go (default: bench/results)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclasses.dataclass
class Plan:
    device: str
    dtype: torch.dtype
    backends: list[str]  # timed (subjects)
    parity_backends: list[str]  # reference first, then the fused ones, interpreter included
    sections: list[str]
    sizes: speed.Sizes
    rounds: int
    quick: bool


def plan(args: argparse.Namespace, error) -> Plan:
    """Check the flags against each other and this machine; ``error(message)`` exits."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: torch sees no CUDA device")
    available = {b: why for b, why in mk.available_backends(device).items()}
    fused = [b for b, why in available.items() if why is None and b != "reference"]
    # On CPU the Triton backend runs only in its interpreter: correct, far too slow to time.
    timeable = [b for b in fused if not (device == "cpu" and b == "triton")]
    named = fused if args.backends is None else list(dict.fromkeys(args.backends))
    for b in named:
        if b not in available:
            error(f"--backends: unknown backend {b!r}; choose from {tuple(available)}")
        if b == "reference":
            error(
                "--backends: 'reference' is the eager comparator, in every section; name "
                "fused backends only"
            )
        if available[b] is not None:
            error(f"--backends: {b!r} cannot run on {device}: {available[b]}")
    backends = [b for b in named if b in timeable]
    parity_backends = ["reference", *named]
    sections = [s for s in args.sections if s not in args.skip]
    if not sections:
        error("--sections/--skip: nothing left to run")
    timed = {"ops", "layers", "decode"} & set(sections)
    if timed and not backends:
        error(
            f"sections {sorted(timed)} need a fused backend to time on {device}, got "
            f"{named or 'none available'} (the Triton interpreter is checked in parity only, "
            "never timed)"
        )
    needs_torchscale = sorted({"models", "memory", "layers", "decode"} & set(sections))
    if needs_torchscale:
        try:
            import_torchscale()
        except ImportError as err:
            error(
                f"sections {needs_torchscale} compare with torchscale: {err}; or leave them "
                f"out with --skip {' '.join(needs_torchscale)}"
            )
    base = SIZES["quick" if args.quick else device]
    sizes = dataclasses.replace(
        base,
        **{
            k: getattr(args, k)
            for k in ("d", "heads", "ffn", "batch", "tokens", "context")
            if getattr(args, k) is not None
        },
    )
    if args.decode_rows is not None:
        sizes.decode_rows = tuple(args.decode_rows)
    for name in ("d", "heads", "ffn", "batch", "tokens", "context"):
        if getattr(sizes, name) < 1:
            error(f"--{name} must be >= 1, got {getattr(sizes, name)}")
    if any(r < 1 for r in sizes.decode_rows):
        error(f"--decode-rows must all be >= 1, got {list(sizes.decode_rows)}")
    if sizes.d % sizes.heads:
        error(f"--d ({sizes.d}) must be divisible by --heads ({sizes.heads})")
    rounds = args.rounds if args.rounds is not None else ROUNDS["quick" if args.quick else device]
    if rounds < 1:
        error(f"--rounds must be >= 1, got {rounds}")
    if args.threads is not None and args.threads < 1:
        error(f"--threads must be >= 1, got {args.threads}")
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return Plan(device, dtype, backends, parity_backends, sections, sizes, rounds, args.quick)


def _ticks(p: Plan) -> int:
    n = 0
    if "parity" in p.sections:
        n += 7 * 2 * len(p.parity_backends)
    if "models" in p.sections:
        n += sum(4 if p.device == "cpu" and b == "triton" else 10 for b in p.parity_backends)
    if "memory" in p.sections:
        n += 2 * (len(p.backends) + 2)
    if "bitnet" in p.sections:
        n += bitnet.TICKS
    cases = {"ops": 8, "layers": 4, "decode": 3 * len(p.sizes.decode_rows)}
    n += p.rounds * sum(c for s, c in cases.items() if s in p.sections)
    return n


def run(p: Plan, command: str, progress: bool = True) -> dict:
    """Every section of the plan; the report's JSON object."""
    from tqdm import tqdm

    started = time.perf_counter()
    timer = harness.gpu_timer() if p.device == "cuda" else harness.cpu_timer()
    settings = speed.Settings(
        p.device, p.dtype, p.backends, "compile" in p.sections, p.rounds, timer
    )
    report = {"command": command, "machine": harness.machine_info(p.device)}
    bar = tqdm(total=_ticks(p), disable=not progress, unit="step", file=sys.stderr)
    tick = bar.update
    if "parity" in p.sections:
        bar.set_description("parity: ops vs float64")
        rows = []
        for backend in p.parity_backends:
            interpreted = backend == "triton" and p.device == "cpu"
            shape = TINY_PARITY_SHAPE if interpreted or p.quick else PARITY_SHAPE
            rows += parity.op_parity(
                [backend], [torch.float32, torch.bfloat16], p.device, *shape, tick=tick
            )
        report["parity_ops"] = rows
    if "models" in p.sections:
        bar.set_description("parity: models vs torchscale")
        interpreted = {"triton"} if p.device == "cpu" else set()
        report["parity_models"] = parity.model_parity(
            p.parity_backends, p.device, subln_only=interpreted, tick=tick
        )
    if "memory" in p.sections:
        bar.set_description("memory")
        sz = p.sizes
        report["memory"] = memory.saved_per_token(
            p.backends, sz.d, sz.heads, sz.ffn, sz.batch, sz.tokens, p.device, p.dtype, tick=tick
        )
    if "bitnet" in p.sections:
        bar.set_description("bitnet: transformers' BitNet patched vs unpatched")
        report["bitnet"] = bitnet.section(p.rounds, tick=tick)
    report["speed"] = []
    builders = {"ops": speed.op_cases, "layers": speed.layer_cases, "decode": speed.decode_cases}
    for section, build in builders.items():
        if section not in p.sections:
            continue
        bar.set_description(f"{section}: building" + (" and compiling" if settings.compile else ""))
        for case in build(p.sizes, settings):
            bar.set_description(f"{section}: {case.name} {case.pass_}")
            report["speed"].append(speed.measure(case, settings, tick=tick))
    bar.close()
    report["settings"] = {
        "device": p.device,
        "dtype": str(p.dtype).replace("torch.", ""),
        "backends": p.backends,
        "parity_backends": p.parity_backends,
        "sections": p.sections,
        "sizes": dataclasses.asdict(p.sizes),
        "rounds": p.rounds,
        "clock": timer.clock,
        "comparators_missing": settings.comparators_missing,
    }
    report["runtime_s"] = time.perf_counter() - started
    report["goals"] = render.goals(report)
    return report


def write(report: dict, out_dir: str) -> dict[str, str]:
    """report-<device>-<dtype>-<date>.{json,md,png} under out_dir (dtype: the speed sections');
    the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    settings = report["settings"]
    stem = os.path.join(out_dir, f"report-{settings['device']}-{settings['dtype']}-{date}")
    paths = {"json": stem + ".json", "md": stem + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    png = stem + ".png"
    if render.plot(report, png):
        paths["png"] = png
    with open(paths["md"], "w") as f:
        f.write(render.markdown(report, os.path.basename(png) if "png" in paths else None))
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    args = ap.parse_args(argv)
    p = plan(args, ap.error)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "magneto.report", *argv])
    report = run(p, command, progress=not args.no_progress)
    paths = write(report, args.out_dir)
    with open(paths["md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0
