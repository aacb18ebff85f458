"""Ahead-of-time compilation of every Triton launch the ops make, for sm_80 and sm_90a, on a
CPU-only machine (docs/design.md, Fitting the GPU).

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every CPU test
and still fail to compile for a GPU, spill registers or ask for more shared memory than a block
may have. ``triton.compile`` with an explicit ``GPUTarget`` needs no device. This test

1. runs the ops' host code (``ln_linear``, ``ln_linear_backward``, ``layer_norm``,
   ``layer_norm_backward``, ``add_layer_norm``, ``ln_linear_group`` and its backward) on meta
   tensors for the calls of ``OP_CALLS``, with ``configs.launch`` replaced by a recorder: every
   launch, with every tile the launcher may choose, specialised as Triton's JIT specialises it
   at such a call (pointers aligned, sizes divisible by 16 or not, sizes equal to 1 made
   constants);
2. compiles each distinct (kernel, specialisation, tile, architecture) in a pool of processes;
3. fails on any spill store, shared memory over the architecture's limit per block or over the
   tile's ``Tile.smem`` bound, more than 64K registers per block, or a dot on the wrong unit
   (bf16, fp16 and tf32 on tensor cores: ``wgmma`` or ``mma.sync``; exact fp32 on FMAs);
4. checks the table of docs/design.md ("Fitting the GPU") against these results: all of it
   when the Triton that wrote it runs, else its tiles.

Each compile's result is kept per Triton version in tests/triton_compiled.json, under the key
Triton's own cache gives the compile (the kernel's source and every jit function and global it
uses, the specialisation, the architecture and ptxas' version, the options, Triton's
cache-invalidating variables): a launch whose key is there is not compiled again (its inputs
are those of the compile that wrote it, and the compiler is deterministic), every other one is.
In the environment that wrote the file (the same ptxas and variables) a compiled launch means a
changed one, and the test fails until the file is rewritten; so CI compiles exactly the launches
a commit changed. ``--no-cache`` compiles them all and fails on any result the file keeps
otherwise.

It runs in a subprocess: the interpreter (TRITON_INTERPRET=1, switched on by conftest.py)
replaces ``triton.jit`` at import time.

    python3 tests/test_triton_compile.py [--jobs N] [--table] [--write-table] [--write-results]
        [--no-cache]

``--table`` prints the table, ``--write-table`` puts it into docs/design.md and the results into
tests/triton_compiled.json (under the oldest Triton, whose table is committed),
``--write-results`` only the results (under any other).
"""

import argparse
import collections
import contextlib
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")
TABLE_BEGIN = "<!-- fitting-table: written by tests/test_triton_compile.py --write-table -->"
TABLE_END = "<!-- fitting-table end -->"
RESULTS = os.path.join(ROOT, "tests", "triton_compiled.json")
RESULT_FIELDS = ("regs", "spills", "smem", "instr")

# The architectures compiled for and their shared memory per block (the GPUs' peaks and SM
# resources, for the table's model, are bench/bench_gpu.py's GPUS).
ARCHS = {
    80: dict(name="sm_80", smem_block=163 * 1024),
    90: dict(name="sm_90a", smem_block=227 * 1024),
}
REGS_PER_SM = 65536

# --------------------------------------------------------------------------- the op calls
# Rows of the three row buckets (configs.ROW_BUCKETS), and 1 (a decode step: M == 1 is a
# constant to Triton, its own compile).
BIG, MID, FEW, ONE = 4096, 48, 8, 1
HEAVY = dict(norm="layer", ln_bias=True, in_act="geglu", act="gelu", bias=True, res=True, p=0.1)
PLAIN = dict(norm="layer", ln_bias=True, in_act="none", act="none", bias=True, res=False, p=0.0)
LINEAR = dict(PLAIN, norm="none")
# Every value of every flag at least once (norm, ln_bias, input and output activation, bias,
# residual, dropout), in nine combinations besides HEAVY: compiling all their products (some
# ten thousand per tile) would take hours; the prologue and the epilogue are separate code
# around the main loop, and HEAVY holds both at their largest.
COVER = [
    dict(norm="rms", ln_bias=False, in_act="none", act="none", bias=False, res=False, p=0.0),
    dict(norm="rms", ln_bias=False, in_act="gelu", act="gelu_tanh", bias=True, res=True, p=0.1),
    dict(norm="layer", ln_bias=False, in_act="gelu_tanh", act="relu", bias=False, res=True, p=0),
    dict(norm="none", ln_bias=False, in_act="relu", act="silu", bias=True, res=False, p=0.1),
    dict(norm="layer", ln_bias=True, in_act="silu", act="relu2", bias=False, res=False, p=0.1),
    dict(norm="rms", ln_bias=False, in_act="relu2", act="none", bias=True, res=True, p=0.0),
    dict(norm="none", ln_bias=False, in_act="swiglu", act="gelu", bias=False, res=True, p=0.1),
    dict(norm="layer", ln_bias=False, in_act="relu2_glu", act="silu", bias=True, res=False, p=0),
    dict(norm="rms", ln_bias=False, in_act="geglu", act="relu", bias=True, res=True, p=0.1),
]
DTYPES = ("fp32", "tf32", "bf16", "fp16")  # fp32: "highest" precision (PyTorch's default)


def _op_calls():
    """(kind, dtype, kwargs, every tile or only the first) of the op calls whose launches are
    compiled: HEAVY (forward and backward) and LINEAR (the plain GEMM, its A operand pipelined
    through shared memory) with every tile of every row bucket, PLAIN with every large tile;
    COVER spread over the three dot kinds, and the other widths, with the tile that runs when
    autotuning is off."""
    calls = []
    for dtype in DTYPES:
        for rows in (BIG, MID, FEW) if dtype != "fp16" else (BIG,):
            calls.append(("ln_linear", dtype, dict(HEAVY, rows=rows, k=4096, n=4096), True))
            linear = dict(LINEAR, rows=rows, k=4096, n=4096, bwd=False)
            calls.append(("ln_linear", dtype, linear, True))
        calls.append(("ln_linear", dtype, dict(PLAIN, rows=BIG, k=4096, n=4096), True))
        decode = dict(HEAVY, rows=ONE, k=4096, n=4096, bwd=False)
        calls.append(("ln_linear", dtype, decode, False))
    for i, flags in enumerate(COVER):
        dtype = DTYPES[i % 3]  # fp16's code is bf16's
        calls.append(("ln_linear", dtype, dict(flags, rows=BIG, k=4096, n=4096), False))
    # Widths on the row kernels' other paths: a gated backward row in registers (2048), the
    # widest forward row in registers (8192), chunked rows (12288), and widths that are not
    # multiples of 16 (loads without vector alignment).
    for k in (2048, 8192, 12288, 1000):
        calls.append(("ln_linear", "bf16", dict(HEAVY, rows=BIG, k=k, n=4096), False))
    calls.append(("ln_linear", "bf16", dict(PLAIN, rows=BIG, k=1000, n=1000), False))
    # ln_linear_group: q/k/v (three weights per launch, biases on some) in every row bucket in
    # bf16, the training and decode buckets in every dot kind; four weights; gate/up unaligned;
    # five weights (a second launch each, whose dh adds the first's). Each backward (not at
    # decode) is the group's dh and dweight launches.
    for dtype in DTYPES:
        for rows in (BIG, MID, FEW, ONE) if dtype == "bf16" else (BIG, FEW):
            group = dict(rows=rows, k=4096, n=(4096, 1024, 1024), norm="layer", bias=(1, 0, 1))
            calls.append(("ln_linear_group", dtype, group, False))
        four = dict(rows=BIG, k=4096, n=(1024,) * 4, norm="rms", bias=(0, 0, 0, 1))
        calls.append(("ln_linear_group", dtype, four, False))
    gate_up = dict(rows=BIG, k=1000, n=(4096, 4096), norm="none", bias=(0, 0))
    calls.append(("ln_linear_group", "bf16", gate_up, False))
    five = dict(rows=BIG, k=4096, n=(1024,) * 5, norm="rms", bias=(1, 0, 0, 0, 1))
    calls.append(("ln_linear_group", "bf16", five, False))
    # The quantised ln_linear (triton/quant.py; BitNet b1.58 2B-4T's widths): the offline modes'
    # int8 GEMM with every tile of every row bucket in bf16 (the checkpoint's dtype), a decode
    # step, down_proj's gated input and fp32; the online mode's forward and backward in the
    # three float dot kinds, gated and not.
    for quant in ("bitnet_offline", "bitlinear"):
        for rows in (BIG, MID, FEW, ONE):
            offline = dict(rows=rows, k=2560, n=6912, quant=quant, gated=False, bias=True)
            calls.append(("quant", "bf16", offline, rows != ONE))
    down = dict(rows=BIG, k=6912, n=2560, quant="bitnet_offline", gated=True, bias=False)
    calls.append(("quant", "bf16", down, False))
    calls.append(("quant", "fp32", dict(down, quant="bitlinear", gated=False), False))
    for dtype in ("fp32", "tf32", "bf16"):
        for gated in (False, True):
            online = dict(rows=BIG, k=2560, n=6912, quant="bitnet_online", gated=gated, bias=gated)
            calls.append(("quant", dtype, online, False))
    # ... and under tensor parallelism (the row's rstd and amax, online the weight's absmean
    # given; the partial backward writing the row sums), online and offline, bf16.
    for quant in ("bitnet_online", "bitnet_offline"):
        sharded = dict(rows=BIG, k=1280, n=6912, quant=quant, gated=True, bias=False, tp=True)
        calls.append(("quant", "bf16", sharded, False))
    # The sharded norm's entry points (tensor parallelism): the row statistics pass (STORE_M2),
    # the GEMM backward writing the row sums and the norm backward reading the reduced means,
    # for the layer and RMS norms, the gated input activation and the widest row in registers.
    for dtype in ("fp32", "bf16"):
        for norm, in_act, k in (("layer", "none", 4096), ("rms", "relu2_glu", 4096),
                                ("layer", "gelu", 8192)):  # fmt: skip
            sharded = dict(rows=BIG, k=k, n=4096, norm=norm, in_act=in_act)
            calls.append(("sharded_norm", dtype, sharded, False))
    for dtype in ("fp32", "bf16"):
        for width in (1000, 8192, 12288):
            calls.append(("layer_norm", dtype, dict(rows=BIG, width=width, norm="layer"), False))
            calls.append(("add_layer_norm", dtype, dict(rows=BIG, width=width, norm="rms"), False))
        calls.append(("dropout", dtype, dict(rows=BIG, width=4096), False))
    return calls


OP_CALLS = _op_calls()


def _run_op_call(kind, dtype_name, spec, all_tiles):
    """Run one op call's host code on meta tensors (its launches are recorded, not run)."""
    import torch

    from magneto_kernels.triton import group as gr
    from magneto_kernels.triton import group_backward as grb
    from magneto_kernels.triton import ln_linear as ll
    from magneto_kernels.triton import norm as nm
    from magneto_kernels.triton import norm_backward as nmb

    dtype = {"fp32": torch.float32, "tf32": torch.float32}.get(dtype_name)
    dtype = dtype or {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    seed = torch.empty((), dtype=torch.int64, device="meta")
    if kind == "dropout":
        from magneto_kernels.triton import dropout

        dropout.dropout(t(spec["rows"], spec["width"]), seed, 0.3)
        return
    if kind == "ln_linear_group":
        rows, k, norm = spec["rows"], spec["k"], spec["norm"]
        x = t(rows, k)
        ln_w = t(k, dt=torch.float32) if norm != "none" else None
        ln_b = t(k, dt=torch.float32) if norm == "layer" else None
        ws = [t(n, k) for n in spec["n"]]
        biases = [t(n) if b else None for n, b in zip(spec["n"], spec["bias"])]
        outs, mean, rstd = gr.ln_linear_group(x, ln_w, ln_b, ws, biases, 1e-5, norm)
        if rows != ONE:  # decoding has no backward
            mask = [True, True, True] + [True] * len(ws) + [bool(b) for b in spec["bias"]]
            grb.ln_linear_group_backward(outs, x, ln_w, ln_b, ws, mean, rstd, norm, mask)
        return
    if kind == "quant":
        from magneto_kernels.triton import quant as tq

        rows, k, n, mode = spec["rows"], spec["k"], spec["n"], spec["quant"]
        x = t(rows, 2 * k if spec["gated"] else k)
        in_act = "relu2_glu" if spec["gated"] else "none"
        online = mode == "bitnet_online"
        w = t(n, k) if online else t(n, k // 4, dt=torch.uint8)
        bias = t(n) if spec["bias"] else None
        scale = None if online else t(1)
        given = (None, None)
        if spec.get("tp"):
            scale, given = t(1, dt=torch.float32), (t(rows, dt=torch.float32),) * 2
        out, _, rstd, _ = tq.ln_linear(
            x, t(k), w, bias, t(rows, n), 1e-6, "rms", in_act, 1.0, mode, scale, *given
        )
        if online and spec.get("tp"):
            sums, mask = t(rows, 1, dt=torch.float32), [False, False, False, True, True]
            tq.ln_linear_backward(out, x, t(k), w, rstd, "rms", in_act, mask, scale, rstd, sums)
        elif online:
            tq.ln_linear_backward(out, x, t(k), w, rstd, "rms", in_act, [True] * 5)
        return
    if kind == "sharded_norm":
        rows, k, n, norm, in_act = (spec[key] for key in ("rows", "k", "n", "norm", "in_act"))
        x = t(rows, 2 * k if in_act == "relu2_glu" else k)
        ln_w, sums = t(k, dt=torch.float32), t(rows, 2 if norm == "layer" else 1, dt=torch.float32)
        _, _, mean, rstd = nm.norm_forward(
            x, None, None, 0.0, norm, input_activation=in_act, write_y=False, store_m2=True
        )
        options = (norm, in_act, "none")
        mask = [True, False, False, True, False]
        ll.ln_linear_backward(
            t(rows, n), x, ln_w, None, t(n, k), mean, rstd, t(0), seed, *options, 0.0, mask,
            row_sums=sums,
        )  # fmt: skip
        nmb.norm_backward(
            t(rows, k), x, ln_w, None, mean, rstd, None, norm, [True, True, False],
            input_activation=in_act, row_means=sums,
        )  # fmt: skip
        return
    if kind != "ln_linear":
        rows, width, norm = spec["rows"], spec["width"], spec["norm"]
        x, w, b = t(rows, width), t(width, dt=torch.float32), t(width, dt=torch.float32)
        b = b if norm == "layer" else None
        if kind == "add_layer_norm":
            nm.add_layer_norm(x, t(rows, width), w, b, 1e-5, 0.5, norm)
            return
        _, mean, rstd = nm.layer_norm(x, w, b, 1e-5, norm)
        nmb.layer_norm_backward(x, x, w, b, mean, rstd, x, norm, [True, True, True])
        return
    rows, k, n, norm = spec["rows"], spec["k"], spec["n"], spec["norm"]
    gated = spec["in_act"] in ("geglu", "swiglu", "relu2_glu")
    x = t(rows, 2 * k if gated else k)
    ln_w = t(k, dt=torch.float32) if norm != "none" else None
    ln_b = t(k, dt=torch.float32) if norm == "layer" and spec["ln_bias"] else None
    w, bias = t(n, k), t(n) if spec["bias"] else None
    res = t(rows, n) if spec["res"] else None
    options = (norm, spec["in_act"], spec["act"])
    out, mean, rstd, preact = ll.ln_linear(
        x, ln_w, ln_b, w, bias, res, seed, 1e-5, *options, 0.7, spec["p"]
    )
    if spec.get("bwd", True):
        mask = [True, True, True, True, spec["bias"]]
        ll.ln_linear_backward(
            out, x, ln_w, ln_b, w, mean, rstd, preact, seed, *options, spec["p"], mask
        )


# ----------------------------------------------------------------------- recording launches


def _record_launches():
    """Every (kernel, args, tile, dot kind, op call) the op calls launch, without running."""
    import torch

    from magneto_kernels.triton import configs

    launches = []
    current = {}

    def record(kernel, grid, tiles, key, **args):
        # a GEMM's operands: B (the forward's weight^T, dh's weight), B0 (the group's first
        # weight^T), DZ in the dweight GEMM, DY0 and DZ0 in the group's dh and dweight GEMMs
        gemm = "BLOCK_K" in dict(tiles[0].meta)
        # W in the quantised GEMM (triton/quant.py): packed uint8 codes, an int8 dot
        names = ("B", "B0", "DZ", "W", "DY0", "DZ0")
        operand = next((args[name] for name in names if name in args), None)
        kind = None
        if gemm:
            kind = configs.dot_kind(torch.int8 if operand.dtype == torch.uint8 else operand.dtype)
        for tile in tiles if current["call"][3] else tiles[:1]:
            launches.append((kernel, args, tile, kind, current["call"]))

    original = configs.launch
    configs.launch = record
    try:
        for call in OP_CALLS:
            current["call"] = call
            _run_op_call(*call)
    finally:
        configs.launch = original
        torch.set_float32_matmul_precision("highest")
    return launches


def _backend(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def _specialize(kernel, args, tile, arch):
    """(signature, constexprs, attrs, options) of the launch as Triton's JIT specialises it."""
    from triton.runtime.jit import create_function_from_signature

    backend = _backend(arch)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    bound, specialization, parsed = binder(**args, **dict(tile.meta), **options)
    _, signature, constexprs, attrs = kernel._pack_args(
        backend, options, bound, specialization, parsed
    )
    return signature, constexprs, attrs, options


# ------------------------------------------------------------------------------ compiling


def _kernel_by_name(name):
    import importlib

    module, fn = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)


def _compile(job):
    """Compile one launch (in a worker process); ptxas' own report gives registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, arch, signature, constexprs, attrs, options = job
    kernel = _kernel_by_name(name)
    started = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v's report
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
    except Exception as err:  # every failure is reported, not just the first
        return dict(error=f"{type(err).__name__}: {str(err)[:1500]}")
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if regs is None or spills is None:
        return dict(error=f"no ptxas report in {text[:500]!r}")
    ptx = compiled.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        instr = "wgmma"
    elif "mma.sync" in ptx:
        instr = "mma.sync"
    else:
        instr = "fma" if "fma.rn.f32" in ptx else "none"
    return dict(
        regs=int(regs.group(1)),
        spills=int(spills.group(1)),
        smem=compiled.metadata.shared,
        instr=instr,
        seconds=time.time() - started,
    )


def _worker_init(root):
    sys.path.insert(0, root)


def compile_all(jobs: int, only: str = "", known: dict | None = None):
    """Record and dedupe every launch (whose "kernel tile" contains ``only``), take the results
    ``known`` keeps (key -> RESULT_FIELDS) and compile the others; returns (results, seconds)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from triton.compiler import ASTSource

    started = time.time()
    launches = _record_launches()
    environment = _environment()
    unique = {}  # compile job -> the launches it stands for
    for kernel, args, tile, kind, call in launches:
        name = f"{kernel.fn.__module__}.{kernel.fn.__name__}"
        for arch in ARCHS:
            signature, constexprs, attrs, options = _specialize(kernel, args, tile, arch)
            job = (name, arch, signature, constexprs, attrs, options)
            if repr(job) not in unique:
                source = ASTSource(kernel, signature, constexprs, attrs)
                unique[repr(job)] = dict(
                    job=job, kernel=kernel.fn.__name__, tile=tile, kind=kind, calls=[],
                    key=_result_key(source, arch, options, environment),
                )  # fmt: skip
            unique[repr(job)]["calls"].append(call)
    entries = [e for e in unique.values() if only in f"{e['kernel']} {e['tile']}"]
    known = known or {}
    for e in entries:
        if e["key"] in known:
            e.update(zip(RESULT_FIELDS, known[e["key"]]), known=True)
    todo = [e for e in entries if not e.get("known")]
    # the slowest (the GEMMs) first, so that the pool ends together
    todo.sort(key=lambda e: e["kind"] is None)
    with ProcessPoolExecutor(jobs, get_context("spawn"), _worker_init, (ROOT,)) as pool:
        for entry, result in zip(todo, pool.map(_compile, [e["job"] for e in todo])):
            entry.update(result)
    return entries, time.time() - started


def _result_key(source, arch, options, environment):
    """What Triton's own cache keys this compile by, less its installation's bytes (a wheel per
    Python version, the same compiler): the source's hash (the kernel, the jit functions and
    globals it uses, the specialisation), the architecture, the full options' hash and the
    environment (``_environment``)."""
    import triton

    full = _backend(arch).parse_options(dict(options, **source.parse_options()))
    key = f"{triton.__version__}-{source.hash()}-{arch}-{full.hash()}-{environment}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _environment():
    """What else decides a compile: ptxas (its version, per architecture) and Triton's
    cache-invalidating variables."""
    from triton.compiler.compiler import get_cache_invalidating_env_vars

    backends = [_backend(arch).hash() for arch in ARCHS]
    variables = sorted(get_cache_invalidating_env_vars().items())
    return hashlib.sha256(f"{backends}-{variables}".encode()).hexdigest()[:32]


def _kept():
    if not os.path.exists(RESULTS):
        return {}
    with open(RESULTS) as f:
        return json.load(f)


def load_results() -> tuple[dict, bool]:
    """This Triton's kept results (key -> [regs, spills, smem, instr]), and whether they were
    compiled in this environment (then a launch missing from them is a changed launch)."""
    import triton

    kept = _kept().get(triton.__version__, {})
    return kept.get("launches", {}), kept.get("environment") == _environment()


def write_results(entries):
    """This Triton's results into tests/triton_compiled.json (the other versions' kept), one
    launch per line."""
    import triton

    versions = _kept()
    versions[triton.__version__] = {
        "environment": _environment(),
        "launches": {
            e["key"]: [e[field] for field in RESULT_FIELDS] for e in entries if "error" not in e
        },
    }
    blocks = []
    for version, kept in sorted(versions.items()):
        rows = ",\n".join(
            f'      "{k}": {json.dumps(v)}' for k, v in sorted(kept["launches"].items())
        )
        blocks.append(
            f'  "{version}": {{\n    "environment": "{kept["environment"]}",\n'
            f'    "launches": {{\n{rows}\n    }}\n  }}'
        )
    with open(RESULTS, "w") as f:
        f.write("{\n" + ",\n".join(blocks) + "\n}\n")


def results_failures(entries, known, same_environment):
    """Kept results that differ from a compile's, or (in the environment that wrote them) are
    missing or left over: a launch changed and the file was not rewritten. In another
    environment (another ptxas, other Triton variables) every launch compiles, which is no
    failure."""
    import triton

    failures = []
    compiled = [e for e in entries if not e.get("known") and "error" not in e]
    for e in compiled:
        if e["key"] in known and known[e["key"]] != [e[field] for field in RESULT_FIELDS]:
            failures.append(
                f"{e['kernel']} {e['tile']}: compiled to {e['regs']} registers, {e['spills']} B "
                f"spills, {e['smem']} B shared memory, {e['instr']}; tests/triton_compiled.json "
                f"kept {known[e['key']]}"
            )
    missing = sum(e["key"] not in known for e in compiled)
    extra = len(set(known) - {e["key"] for e in entries})
    if same_environment and (missing or extra):
        committed = committed_table() or ""
        oldest = committed.startswith(f"Triton {triton.__version__};")
        write = "--write-table" if oldest else "--write-results"
        failures.append(
            f"tests/triton_compiled.json is stale under Triton {triton.__version__}: {missing} "
            f"launches compiled that it lacks, {extra} kept results of no launch; run "
            f"`python3 tests/test_triton_compile.py {write}` under it"
        )
    return failures


# ------------------------------------------------------------------------------- checking


def check(entries):
    """The failures, one line each."""
    failures = []
    for e in entries:
        arch = ARCHS[e["job"][1]]
        where = f"{e['kernel']} {e['tile']} {arch['name']} ({_flags(e)})"
        if "error" in e:
            failures.append(f"{where}: does not compile: {e['error']}")
            continue
        if e["spills"]:
            failures.append(f"{where}: {e['spills']} B of spill stores")
        if e["smem"] > arch["smem_block"]:
            failures.append(f"{where}: {e['smem']} B shared memory > {arch['smem_block']}")
        if e["tile"].itemsize and e["smem"] > e["tile"].smem:
            failures.append(f"{where}: {e['smem']} B shared memory > Tile.smem {e['tile'].smem}")
        if _regs_per_warp(e["regs"]) * e["tile"].num_warps > REGS_PER_SM:
            failures.append(f"{where}: {e['regs']} registers x {e['tile'].num_warps} warps")
        tensor_cores = ("wgmma", "mma.sync")
        want = {"mma16": tensor_cores, "tf32": tensor_cores, "int8": tensor_cores, "ieee": ("fma",)}
        if e["kind"] is not None and e["instr"] not in want[e["kind"]]:
            failures.append(f"{where}: {e['kind']} dot compiles to {e['instr']}")
    return failures


def _flags(e):
    """The launch's flags, and its sizes and strides that are 1 or not multiples of 16."""
    _, _, signature, constexprs, attrs, _ = e["job"]
    kernel = _kernel_by_name(e["job"][0])
    names = {(i,): p.name for i, p in enumerate(kernel.params)}
    flags = [
        f"{names[k]}={v}"
        for k, v in sorted(constexprs.items())
        if names[k].isupper() and not names[k].startswith("BLOCK") and v is not None
    ]
    sizes = [
        f"{names[k]}=1" for k, v in sorted(constexprs.items()) if v == 1 and names[k].islower()
    ]
    odd = [
        p.name
        for i, p in enumerate(kernel.params)
        if signature[p.name] == "i32" and not attrs.get((i,))
    ]
    return ", ".join(flags + sizes + [f"{n}%16!=0" for n in odd])


def _regs_per_warp(regs):
    return math.ceil(regs * 32 / 256) * 256  # allocated per warp in units of 256


# ---------------------------------------------------------------------------------- table


def _groups(entries):
    """Results per (kernel, dot kind, tile, arch): the worst over the flag variants."""
    groups = collections.defaultdict(list)
    for e in entries:
        if "error" not in e:
            groups[e["kernel"], e["kind"] or "", str(e["tile"]), e["job"][1]].append(e)
    return groups


def table(entries):
    """The markdown of docs/design.md's generated table."""
    import triton

    from bench.bench_gpu import blocks_per_sm

    lines = [
        f"Triton {triton.__version__}; worst case over the {len(entries) // len(ARCHS)} "
        "compiled launches per architecture (tests/test_triton_compile.py, which fails on any "
        "spill):",
        "",
        "| kernel | dot | tile (M×N×K, warps, stages) | arch | launches | registers | spills "
        "| shared memory | blocks/SM | instruction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"_ln_matmul_kernel": 0, "_dweight_kernel": 1}
    groups = _groups(entries)
    for (kernel, kind, tile, arch), group in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0])
    ):
        regs = max(e["regs"] for e in group)
        smem = max(e["smem"] for e in group)
        warps = group[0]["tile"].num_warps
        lines.append(
            f"| `{kernel.strip('_')}` | {kind or '–'} | {tile} | {ARCHS[arch]['name']} "
            f"| {len(group)} | {regs} | {max(e['spills'] for e in group)} "
            f"| {smem / 1024:.1f} KiB | {blocks_per_sm(regs, smem, warps, arch)} "
            f"| {'/'.join(sorted({e['instr'] for e in group})) if kind else '–'} |"
        )
    lines += ["", *_peak_fractions(groups)]
    return "\n".join(lines) + "\n"


def _peak_fractions(groups):
    """The forward GEMM's expected fraction of peak at the report's sizes (bench/bench_gpu.py's
    model), with the tile that runs when autotuning is off and its compiled registers and
    shared memory."""
    from bench.bench_gpu import GPUS, blocks_per_sm, expected_fraction
    from magneto.report.cli import SIZES
    from magneto_kernels.triton import configs

    sz = SIZES["cuda"]
    cases = [("fc1", sz.rows, sz.d, sz.ffn), ("fc2", sz.rows, sz.ffn, sz.d)]
    cases += [("fc1 decode", r, sz.d, sz.ffn) for r in sz.decode_rows]
    lines = [
        "| GEMM | dot | GPU | tile | programs | waves | bound | expected fraction of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    itemsize = {"mma16": 2, "tf32": 4, "ieee": 4}
    for label, m, k, n in cases:
        for kind in ("mma16", "tf32", "ieee"):
            bm, bn, bk, warps, stages = configs.GEMM_TILES[kind, configs.row_bucket(m)][0]
            tile = configs.gemm_tile(bm, bn, bk, warps, stages, itemsize[kind])
            for arch in ARCHS:
                group = groups[("_ln_matmul_kernel", kind, str(tile), arch)]
                regs = max(e["regs"] for e in group)
                smem = max(e["smem"] for e in group)
                blocks = blocks_per_sm(regs, smem, warps, arch)
                model = expected_fraction(m, k, n, kind, bm, bn, blocks, itemsize[kind], arch)
                lines.append(
                    f"| {label} M={m} K={k} N={n} | {kind} | {GPUS[arch]['gpu']} | {tile} "
                    f"| {model['programs']} | {model['waves']} | {model['bound']} "
                    f"| {model['fraction']:.2f} |"
                )
    return lines


def committed_table():
    with open(DESIGN) as f:
        text = f.read()
    if TABLE_BEGIN not in text:
        return None
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"


def write_table(markdown):
    with open(DESIGN) as f:
        text = f.read()
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    with open(DESIGN, "w") as f:
        f.write(f"{head}{TABLE_BEGIN}\n{markdown}{TABLE_END}{tail}")


def _tiles_only(markdown):
    """The table's rows without the compiled numbers: what the configs alone decide."""
    return [line.split("|")[1:5] for line in markdown.splitlines() if line.startswith("| `")]


def table_failures(markdown):
    import triton

    committed = committed_table()
    if committed is None:
        return ["docs/design.md has no generated table: run --write-table"]
    if committed.startswith(f"Triton {triton.__version__};"):
        if committed != markdown:
            return ["docs/design.md's table is not what this compile gives: run --write-table"]
    elif _tiles_only(committed) != _tiles_only(markdown):
        return ["docs/design.md's table has other kernels or tiles than the configs: run "
                "--write-table"]  # fmt: skip
    return []


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="compiling processes")
    parser.add_argument("--table", action="store_true", help="print the table")
    parser.add_argument("--write-table", action="store_true", help="write it to docs/design.md")
    parser.add_argument("--only", default="", help='compile the "kernel tile"s containing it')
    parser.add_argument(
        "--write-results", action="store_true", help="write tests/triton_compiled.json only"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="compile every launch, even those the file keeps"
    )
    args = parser.parse_args(argv)
    known, same_environment = load_results()
    entries, seconds = compile_all(args.jobs, args.only, {} if args.no_cache else known)
    failures = check(entries)
    compiled = collections.Counter(e["kernel"] for e in entries if not e.get("known"))
    print(
        f"{len(entries)} launches: {len(entries) - sum(compiled.values())} results kept in "
        f"tests/triton_compiled.json (sources unchanged), {sum(compiled.values())} compiled "
        f"({dict(compiled)}) in {seconds:.0f} s, {args.jobs} jobs"
    )
    # the table needs every kernel's launches (its GEMM model reads _ln_matmul_kernel's)
    markdown = table(entries) if not args.only else ""
    if args.table:
        print(markdown)
    if args.write_table:
        write_table(markdown)
    if args.write_table or args.write_results:
        write_results(entries)
    elif not args.only:
        failures += table_failures(markdown) + results_failures(entries, known, same_environment)
    for line in failures:
        print("FAIL", line)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


def test_kept_results_are_stale_only_in_their_environment():
    """A launch compiled because the file lacks it fails the test where the file was written
    (a changed launch), not elsewhere; a compile that differs from a kept result fails always."""
    pytest.importorskip("triton.backends.nvidia")
    result = dict(kernel="_k", tile="t", spills=0, smem=0, instr="fma")
    entries = [dict(result, key="a", regs=1, known=True), dict(result, key="b", regs=2)]
    known = {"a": [1, 0, 0, "fma"], "c": [3, 0, 0, "fma"]}
    (stale,) = results_failures(entries, known, same_environment=True)
    assert "1 launches compiled that it lacks, 1 kept results of no launch" in stale
    assert results_failures(entries, known, same_environment=False) == []
    known["b"] = [9, 0, 0, "fma"]
    (differs,) = results_failures(entries, known, same_environment=False)
    assert "compiled to 2 registers" in differs and "kept [9, 0, 0, 'fma']" in differs


@pytest.mark.slow
def test_every_launch_compiles_for_sm80_and_sm90a_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    # The subprocess must compile this checkout's kernels, not whichever magneto_kernels an
    # editable install points at: the script's own folder (tests/) would come first on its path.
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, cwd=ROOT
    )
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-6000:]


if __name__ == "__main__":
    # before triton is imported, here and in the spawned workers
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's report, from the compile itself
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # no cached kernel: every launch is compiled
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        sys.exit(main())
