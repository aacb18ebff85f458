"""Ahead-of-time compilation of every Triton kernel for the GPU (sm_90a), on a CPU-only machine.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every CPU
test and still fail to compile for a GPU (a type mismatch in a loop-carried variable, an API the
compiler rejects). ``triton.compile`` with an explicit ``GPUTarget`` needs no device, so this
test compiles each kernel, for the flag combinations the ops use, down to PTX and cubin, and
reports ptxas' register and spill counts. It runs in a subprocess because the interpreter
(TRITON_INTERPRET=1, switched on by conftest.py) replaces ``triton.jit`` at import time.
"""

import os
import re
import subprocess
import sys

import pytest

ARCH = 90


def _compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from magneto_kernels.triton import ln_linear as ll
    from magneto_kernels.triton import norm as nm
    from magneto_kernels.triton import philox as ph

    # Triton's own choice of ptxas for the target: newer releases ship more than one (3.9's
    # bin/ptxas is too old for the PTX it emits for sm_90a; get_ptxas picks the right one).
    ptxas = get_ptxas(ARCH).path
    target = GPUTarget("cuda", ARCH, 32)
    failures = []

    def build(label, fn, types, consts, num_warps=4, num_stages=3, max_spill=None):
        # constexprs a configuration leaves out (GATED) take their defaults, as in a launch
        defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
        consts = {**defaults, **consts}
        sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        )
        try:
            kernel = triton.compile(
                src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
            )
        except Exception as err:  # report every failure, not just the first
            failures.append(label)
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[:2000]}", flush=True)
            return
        report = "no ptxas"
        if os.path.exists(ptxas):
            path = f"/tmp/magneto_aot_{os.getpid()}.ptx"
            with open(path, "w") as f:
                f.write(kernel.asm["ptx"])
            out = subprocess.run(
                [ptxas, "-v", f"--gpu-name=sm_{ARCH}a", path, "-o", os.devnull],
                capture_output=True,
                text=True,
            ).stderr
            os.remove(path)
            regs = re.search(r"Used (\d+) registers", out)
            spill = re.search(r"(\d+) bytes spill stores", out)
            report = (
                f"{regs.group(1) if regs else '?'} regs, "
                f"{spill.group(1) if spill else '?'} B spill stores"
            )
            if max_spill is not None and spill is None:  # a limit that cannot be read fails
                failures.append(label)
                report += f"  (ptxas printed no spill count: {out.strip()[:500]!r})"
            elif max_spill is not None and int(spill.group(1)) > max_spill:
                failures.append(label)
                report += f"  > {max_spill} allowed"
        print(f"ok   {label}: smem {kernel.metadata.shared} B, {report}", flush=True)

    # Row kernels (bf16 data, fp32 params), in-register and chunked rows.
    fwd_types = {n: "*bf16" for n in ("X", "RES", "Y", "S")}
    fwd_types.update({n: "*fp32" for n in ("GAMMA", "BETA", "MEAN", "RSTD")})
    fwd_types.update({"N": "i32", "eps": "fp32", "alpha": "fp32"})
    for norm, in_act, has_res, single, block in [
        (0, 0, True, True, 4096),
        (1, 1, False, True, 8192),
        (0, 0, False, False, nm.CHUNK),
    ]:
        build(
            f"norm_fwd norm={norm} in_act={in_act} res={has_res} block={block}",
            nm._norm_fwd_kernel,
            fwd_types,
            dict(
                NORM=norm,
                IN_ACT=in_act,
                HAS_RES=has_res,
                HAS_GAMMA=True,
                HAS_BETA=norm == 0,
                WRITE_Y=True,
                BLOCK_N=block,
                SINGLE=single,
            ),
            num_warps=nm.row_block(block if single else 10**5)[2],
            max_spill=0,
        )
    bwd_types = {n: "*bf16" for n in ("X", "GRAD_ACCUM", "DX")}
    bwd_types.update(
        {n: "*fp32" for n in ("DY", "GAMMA", "MEAN", "RSTD", "DGAMMA_PART", "DBETA_PART")}
    )
    bwd_types.update({"M": "i32", "N": "i32", "rows_per_prog": "i32"})
    for norm, in_act, single, block in [
        (0, 0, True, 4096),
        (1, 2, True, 2048),
        (2, 1, True, 1024),
        (0, 0, False, nm.CHUNK),
    ]:
        build(
            f"norm_bwd norm={norm} in_act={in_act} block={block}",
            nm._norm_bwd_kernel,
            bwd_types,
            dict(
                NORM=norm,
                IN_ACT=in_act,
                HAS_GAMMA=norm != 2,
                HAS_GRAD_ACCUM=True,
                WANT_DX=True,
                WANT_DGAMMA=norm != 2,
                WANT_DBETA=norm == 0,
                BLOCK_N=block,
                SINGLE=single,
            ),
            num_warps=nm.row_block(block if single else 10**5, nm.MAX_FUSED_WIDTH_BACKWARD)[2],
            max_spill=64,
        )
    build(
        "column_sum",
        nm._column_sum_kernel,
        {"P": "*fp32", "OUT": "*bf16", "R": "i32", "N": "i32"},
        dict(BLOCK_R=32, BLOCK_N=256),
    )
    build(
        "philox",
        ph._philox_test_kernel,
        {"seed_ptr": "*i64", "index_ptr": "*i64", "out_ptr": "*i64", "n": "i32"},
        dict(BLOCK=1024),
    )

    # GEMMs, every autotune config for the bf16 forward; one config for the other variants.
    def gemm_types(dt):
        types = {n: f"*{dt}" for n in ("A", "B", "C", "PREACT", "RES", "BIAS")}
        types.update({n: "*fp32" for n in ("MEAN", "RSTD", "GAMMA", "BETA")})
        types.update(
            {n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn")}
        )
        types.update({"SEED": "*i64", "threshold": "i64", "dropout_scale": "fp32", "alpha": "fp32"})
        return types

    plain = dict(
        NORM=0,
        IN_ACT=0,
        HAS_GAMMA=True,
        HAS_BETA=True,
        HAS_BIAS=True,
        ACT=0,
        WRITE_PREACT=False,
        DROPOUT=False,
        HAS_RES=False,
        DOT_FP32=False,
        PRECISION="tf32",
        GROUP_M=8,
    )
    full = dict(plain, IN_ACT=1, ACT=1, WRITE_PREACT=True, DROPOUT=True, HAS_RES=True)
    dh = dict(plain, NORM=2, HAS_GAMMA=False, HAS_BETA=False, HAS_BIAS=False)
    configs = ll._gemm_configs()
    for cfg in configs:
        build(
            f"ln_matmul bf16 plain {cfg}",
            ll._ln_matmul_kernel,
            gemm_types("bf16"),
            dict(plain, **{k: v for k, v in cfg.kwargs.items() if k != "GROUP_M"}),
            cfg.num_warps,
            cfg.num_stages,
        )
    cfg = configs[0]
    tiles = {k: v for k, v in cfg.kwargs.items() if k != "GROUP_M"}
    build(
        f"ln_matmul bf16 full epilogue {cfg}",
        ll._ln_matmul_kernel,
        gemm_types("bf16"),
        dict(full, **tiles),
        cfg.num_warps,
        cfg.num_stages,
    )
    build(
        f"ln_matmul bf16 dh {cfg}",
        ll._ln_matmul_kernel,
        gemm_types("bf16"),
        dict(dh, **tiles),
        cfg.num_warps,
        cfg.num_stages,
    )
    for precision in ("ieee", "tf32"):
        build(
            f"ln_matmul fp32 {precision} {cfg}",
            ll._ln_matmul_kernel,
            gemm_types("fp32"),
            dict(plain, PRECISION=precision, **tiles),
            cfg.num_warps,
            cfg.num_stages,
        )
    dw_types = {
        "DZ": "*bf16",
        "X": "*bf16",
        "DWEIGHT": "*bf16",
        "MEAN": "*fp32",
        "RSTD": "*fp32",
        "GAMMA": "*fp32",
        "BETA": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    }
    build(
        f"dw bf16 in_act {cfg}",
        ll._dweight_kernel,
        dw_types,
        dict(
            NORM=0,
            IN_ACT=1,
            HAS_GAMMA=True,
            HAS_BETA=True,
            DOT_FP32=False,
            PRECISION="tf32",
            **cfg.kwargs,
        ),
        cfg.num_warps,
        cfg.num_stages,
    )
    dz_types = {
        "DY": "*bf16",
        "PREACT": "*bf16",
        "SEED": "*i64",
        "DZ": "*bf16",
        "DBIAS_PART": "*fp32",
        "M": "i32",
        "N": "i32",
        "threshold": "i64",
        "dropout_scale": "fp32",
    }
    build(
        "dz gelu+dropout",
        ll._linear_epilogue_backward_kernel,
        dz_types,
        dict(ACT=1, DROPOUT=True, WRITE_DZ=True, WANT_DBIAS=True, BLOCK_M=32, BLOCK_N=128),
        max_spill=64,
    )
    # Absent tensors are None, specialised as constexpr None (what the launches pass).
    none = lambda *names: {n: None for n in names}  # noqa: E731
    build(
        "norm_fwd rms stats only, None pointers",
        nm._norm_fwd_kernel,
        fwd_types,
        dict(
            none("RES", "Y", "S", "GAMMA", "BETA", "MEAN"),
            NORM=1,
            IN_ACT=1,
            HAS_RES=False,
            HAS_GAMMA=False,
            HAS_BETA=False,
            WRITE_Y=False,
            BLOCK_N=1024,
            SINGLE=True,
        ),
    )
    for single, block in [(True, 1024), (False, nm.CHUNK)]:
        build(
            f"norm_bwd none/rms None pointers single={single}",
            nm._norm_bwd_kernel,
            bwd_types,
            dict(
                none("GAMMA", "MEAN", "GRAD_ACCUM", "DBETA_PART", "DGAMMA_PART"),
                NORM=1,
                IN_ACT=0,
                HAS_GAMMA=False,
                HAS_GRAD_ACCUM=False,
                WANT_DX=True,
                WANT_DGAMMA=False,
                WANT_DBETA=False,
                BLOCK_N=block,
                SINGLE=single,
            ),
        )
        build(
            f"norm_bwd dgamma only single={single}",
            nm._norm_bwd_kernel,
            bwd_types,
            dict(
                none("MEAN", "GRAD_ACCUM", "DX", "DBETA_PART"),
                NORM=1,
                IN_ACT=0,
                HAS_GAMMA=True,
                HAS_GRAD_ACCUM=False,
                WANT_DX=False,
                WANT_DGAMMA=True,
                WANT_DBETA=False,
                BLOCK_N=block,
                SINGLE=single,
            ),
        )
    build(
        f"ln_matmul bf16 dh None pointers {cfg}",
        ll._ln_matmul_kernel,
        gemm_types("bf16"),
        dict(dh, **tiles, **none("PREACT", "MEAN", "RSTD", "GAMMA", "BETA", "BIAS", "RES", "SEED")),
        cfg.num_warps,
        cfg.num_stages,
    )
    build(
        f"dweight no norm None pointers {cfg}",
        ll._dweight_kernel,
        dw_types,
        dict(
            NORM=2,
            IN_ACT=1,
            HAS_GAMMA=False,
            HAS_BETA=False,
            DOT_FP32=False,
            PRECISION="tf32",
            **cfg.kwargs,
            **none("MEAN", "RSTD", "GAMMA", "BETA"),
        ),
        cfg.num_warps,
        cfg.num_stages,
    )
    build(
        "linear_epilogue_backward dbias only",
        ll._linear_epilogue_backward_kernel,
        dz_types,
        dict(
            ACT=0,
            DROPOUT=False,
            WRITE_DZ=False,
            WANT_DBIAS=True,
            BLOCK_M=32,
            BLOCK_N=128,
            **none("PREACT", "SEED", "DZ"),
        ),
    )
    # Gated input activations (x = [gate | up], IN_ACT the gate's activation): ln_linear's
    # prologue statistics, its forward GEMM, the dweight GEMM and the norm backward.
    for norm, in_act, single, block in [(1, 5, True, 8192), (0, 4, False, nm.CHUNK)]:
        build(
            f"norm_fwd gated stats norm={norm} in_act={in_act} block={block}",
            nm._norm_fwd_kernel,
            fwd_types,
            dict(
                none("RES", "Y", "S", "GAMMA", "BETA", *(("MEAN",) if norm == 1 else ())),
                NORM=norm,
                IN_ACT=in_act,
                HAS_RES=False,
                HAS_GAMMA=False,
                HAS_BETA=False,
                WRITE_Y=False,
                BLOCK_N=block,
                SINGLE=single,
                GATED=True,
            ),
            num_warps=nm.row_block(block if single else 10**5)[2],
            max_spill=0,
        )
    for norm, in_act, single, block in [
        (0, 1, True, 2048),
        (1, 5, True, 2048),
        (1, 1, True, 512),
        (0, 4, False, nm.CHUNK),
        (1, 5, False, nm.CHUNK),
    ]:
        build(
            f"norm_bwd gated norm={norm} in_act={in_act} block={block}",
            nm._norm_bwd_kernel,
            bwd_types,
            dict(
                none("GRAD_ACCUM", *(("MEAN", "DBETA_PART") if norm == 1 else ())),
                NORM=norm,
                IN_ACT=in_act,
                HAS_GAMMA=True,
                HAS_GRAD_ACCUM=False,
                WANT_DX=True,
                WANT_DGAMMA=True,
                WANT_DBETA=norm == 0,
                BLOCK_N=block,
                SINGLE=single,
                GATED=True,
            ),
            num_warps=nm.backward_row_block(block if single else 10**5, gated=True)[2],
            max_spill=64,
        )
    gated = dict(plain, NORM=1, IN_ACT=5, HAS_BETA=False, GATED=True)
    for cfg in configs:
        build(
            f"ln_matmul bf16 gated rms relu2_glu {cfg}",
            ll._ln_matmul_kernel,
            gemm_types("bf16"),
            dict(gated, BETA=None, **{k: v for k, v in cfg.kwargs.items() if k != "GROUP_M"}),
            cfg.num_warps,
            cfg.num_stages,
        )
    cfg = configs[0]
    build(
        f"ln_matmul bf16 gated no norm swiglu {cfg}",
        ll._ln_matmul_kernel,
        gemm_types("bf16"),
        dict(
            plain,
            NORM=2,
            IN_ACT=4,
            HAS_GAMMA=False,
            HAS_BETA=False,
            GATED=True,
            **tiles,
            **none("MEAN", "RSTD", "GAMMA", "BETA"),
        ),
        cfg.num_warps,
        cfg.num_stages,
    )
    build(
        f"dweight gated layer geglu {cfg}",
        ll._dweight_kernel,
        dw_types,
        dict(
            NORM=0,
            IN_ACT=1,
            HAS_GAMMA=True,
            HAS_BETA=True,
            DOT_FP32=False,
            PRECISION="tf32",
            GATED=True,
            **cfg.kwargs,
        ),
        cfg.num_warps,
        cfg.num_stages,
    )
    print(f"{len(failures)} failures: {failures}")
    return 1 if failures else 0


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    # The subprocess must compile this checkout's kernels, not whichever magneto_kernels an
    # editable install points at: the script's own folder (tests/) would come first on its path.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


if __name__ == "__main__":
    sys.exit(_compile_all())
