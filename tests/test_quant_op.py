"""ln_linear's quantised projection (``quant=``, BitNet b1.58) through the op, on every backend
that has it (``quant.BACKENDS``): the offline modes (integer kernels on the cpu backend,
whichever ISA build runs: tools/with_cpu_isa.sh forces the others; the triton int8 GEMM, in the
interpreter here; the cuda dp4a kernels, in the emulation) against a float64 evaluation of
transformers' formula, one activation code of difference allowed only at detected rounding ties
(``quant.float64_codes``); the online mode forward and every gradient against the reference;
the packed layout; bad arguments refused with the same error on every backend; a backend
without the kernels refusing the mode."""

from __future__ import annotations

import pytest
import torch

from magneto_kernels import ops, quant
from magneto_kernels.codes import QUANT_PACK_UNIT, RTOL
from tests.harness import (
    ATOL,
    BY_NAME,
    ELEMENT_RTOL_FACTOR,
    assert_close,
    assert_elementwise,
    backend_params,
    compare_to_reference,
    randn,
    require_backend,
)

K, N, EPS = 2 * QUANT_PACK_UNIT, 48, 1e-6
OFFLINE = quant.OFFLINE_MODES
# Decode sizes (1-15 rows: the cpu kernel's row groups of 4 and their tails) and the tiled
# kernel's (16 rows on: tiles of 4 or 2 rows, with tails).
ROWS = (1, 3, 15, 16, 17, 37, 130)


def _backends():
    """The backends with the quantised projection (``quant.BACKENDS``; the others refuse it,
    tested below)."""
    return [p for p in backend_params() if p.values[0].name in quant.BACKENDS]


def _ternary(out_features, in_features, generator):
    return torch.randint(-1, 2, (out_features, in_features), generator=generator).float()


def _case(rows, dtype, gated, seed, k=K, n=N):
    gen = torch.Generator().manual_seed(seed)
    x = randn(rows, 2 * k if gated else k, dtype=dtype, mean=0.3, std=1.2, generator=gen)
    ln_weight = randn(k, dtype=dtype, mean=1.0, std=0.2, generator=gen)
    t = _ternary(n, k, gen)
    bias = randn(n, dtype=dtype, mean=0.1, std=0.5, generator=gen)
    residual = randn(rows, n, dtype=dtype, mean=-0.2, generator=gen)
    weight_scale = torch.tensor([0.37 + 0.1 * seed], dtype=dtype)
    return x, ln_weight, t, bias, residual, weight_scale


def _float64_offline(x, ln_weight, t, bias, residual, weight_scale, mode, gated, h=None):
    """transformers' offline formula in float64 from the float64 normalised row (or the given
    h), and per output element the room the tie codes leave: Σ_tie |t|·(its code's worth)."""
    if h is None:
        a = quant.relu2_glu(x.double()) if gated else x.double()
        h = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS) * ln_weight.double()
    h = h.double()
    s = quant.QMAX / h.abs().amax(-1, keepdim=True).clamp(min=quant.ACT_EPS)
    q, tie = quant.float64_codes(h, s)
    acc = q @ t.double().T
    slack = tie.double() @ t.double().abs().T
    ws, b = weight_scale.double(), bias.double()
    if mode == "bitlinear":
        y, worth = acc / (ws * s) + b, 1.0 / (ws * s)
    else:
        y, worth = (acc / s + b) * ws, ws / s
    return residual.double() + y, slack * worth


def _run(backend, x, ln_weight, t, bias, residual, weight_scale, mode, gated):
    x, ln_weight, bias, residual, weight_scale, packed = (
        v.to(backend.device) for v in (x, ln_weight, bias, residual, weight_scale, quant.pack(t))
    )
    return ops.ln_linear(
        x, ln_weight, None, packed, bias, eps=EPS, norm="rms",
        input_activation="relu2_glu" if gated else None, residual=residual,
        quant=mode, weight_scale=weight_scale, backend=backend.name,
    ).cpu()  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("mode", OFFLINE)
@pytest.mark.parametrize("rows", ROWS)
def test_offline_fp32_matches_float64_up_to_ties(backend, mode, gated, rows):
    _check_fp32_offline(backend, _case(rows, torch.float32, gated, rows), mode, gated)


def _check_fp32_offline(backend, case, mode, gated):
    with backend.running():
        out = _run(backend, *case, mode, gated)
    ref, slack = _float64_offline(*case, mode, gated)
    err = ((out.double() - ref).abs() - slack).clamp(min=0)
    bound = ELEMENT_RTOL_FACTOR * RTOL[torch.float32] * ref.abs().max().item()
    assert_elementwise(err, ref, bound, ATOL, "output")


# (rows, in_features, out_features) at the cpu kernels' edges: one packing unit; features around
# the micro-tile (4) and the task (16) widths; 4096 wide, so that 130 rows span two of the tiled
# kernel's row blocks and several of the prologue's.
SHAPES = [
    (3, QUANT_PACK_UNIT, 5),
    (16, QUANT_PACK_UNIT, 1),
    (17, 3 * QUANT_PACK_UNIT, 3),
    (20, 3 * QUANT_PACK_UNIT, 17),
    (37, QUANT_PACK_UNIT, 33),
    (130, 32 * QUANT_PACK_UNIT, 22),
]


def _check_edges(backend, shape, gated):
    rows, k, n = shape
    x, ln_weight, t, bias, residual, weight_scale = _case(rows, torch.float32, gated, 7, k, n)
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, "bitnet_offline", gated)
    ref, slack = _float64_offline(
        x, ln_weight, t, bias, residual, weight_scale, "bitnet_offline", gated
    )
    err = ((out.double() - ref).abs() - slack).clamp(min=0)
    bound = ELEMENT_RTOL_FACTOR * RTOL[torch.float32] * ref.abs().max().item()
    assert_elementwise(err, ref, bound, ATOL, "output")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_offline_edges_match_float64_up_to_ties(backend, shape, gated):
    _check_edges(backend, shape, gated)


@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_offline_edges_without_amx_cpu(shape, gated, monkeypatch):
    """The same on the cpu backend with AMX switched off (MAGNETO_CPU_AMX=0, read per call):
    where the CPU has AMX-INT8 the test above ran the AMX tiles, this one the vector tiles."""
    require_backend("cpu")
    monkeypatch.setenv("MAGNETO_CPU_AMX", "0")
    _check_edges(BY_NAME["cpu"], shape, gated)


# (in_features, out_features): the few-row kernel's last feature group 1 or 3 wide (groups of
# 4), and 128-wide k blocks in pairs, the second with an odd one left; fp16 (its own rounding of
# the epilogue) on the first.
BITWISE_CASES = [
    (dtype, shape)
    for shape in ((4 * K, 37), (9 * QUANT_PACK_UNIT, 39))
    for dtype in (torch.float32, torch.bfloat16)
] + [(torch.float16, (4 * K, 37))]


def _check_cpu_paths_agree(mode, dtype, shape, rows, monkeypatch):
    require_backend("cpu")
    cpu = BY_NAME["cpu"]
    x, ln_weight, t, bias, residual, weight_scale = _case(rows, dtype, True, 3, *shape)
    args = (ln_weight, t, bias)
    whole = _run(cpu, x, *args, residual, weight_scale, mode, True)
    parts = [
        _run(cpu, x[i : i + 5], *args, residual[i : i + 5], weight_scale, mode, True)
        for i in range(0, rows, 5)
    ]
    # One row (decoding one sequence) has a kernel of its own on AVX2: some rows, one at a time.
    singles = [
        _run(cpu, x[i : i + 1], *args, residual[i : i + 1], weight_scale, mode, True)
        for i in range(0, rows, 13)
    ]
    monkeypatch.setenv("MAGNETO_CPU_AMX", "0")
    vector = _run(cpu, x, *args, residual, weight_scale, mode, True)
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole[::13], torch.cat(singles))
    assert torch.equal(vector, whole)


@pytest.mark.parametrize(
    "dtype, shape",
    BITWISE_CASES,
    ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c),
)
@pytest.mark.parametrize("mode", OFFLINE)
def test_offline_cpu_paths_agree_bitwise(mode, dtype, shape, monkeypatch):
    """Every output element is an exact integer sum and one fixed float expression, so the cpu
    backend's tiled kernels (130 rows at once: AMX where the CPU has it, and with
    MAGNETO_CPU_AMX=0 the vector tiles) and its few-row kernels (the same rows 5 at a time: 4
    and 1; and one at a time) give the same bits."""
    _check_cpu_paths_agree(mode, dtype, shape, 130, monkeypatch)


@pytest.mark.parametrize("rows", (16, 17, 31, 32, 33, 63, 64, 65))
def test_offline_cpu_paths_agree_bitwise_at_row_edges(rows, monkeypatch):
    """The same at the tiled kernels' row edges: the first tiled count (16), AMX's 32-row blocks
    (a block of rows zero-padded, full, or full and one more) and the vector tiles' 4-row tiles;
    37 features: each task packs its codes, the last task's second 16-feature group empty."""
    _check_cpu_paths_agree("bitnet_offline", torch.float32, (4 * K, 37), rows, monkeypatch)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", (1, 5, 20))
def test_offline_integer_sums_at_their_extremes(backend, rows):
    """Every activation code at ±127 against weights all +1, all -1 and alternating, over 33
    blocks of 128 k: the integer sums reach ±127·k, and the kernels' narrow partial sums (the
    AVX2 kernels sum 16 blocks in int16 lanes before widening) would wrap at the first
    overflow. One row, four and one (the few-row kernels), and 20 (the tiled kernel)."""
    k, n = 33 * QUANT_PACK_UNIT, 6
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])[:rows].repeat(rows // 5 + 1)[:rows]
    x = signs[:, None] * torch.full((rows, k), 0.75)
    t = torch.stack(
        [torch.ones(k), -torch.ones(k), torch.ones(k).index_fill(0, torch.arange(0, k, 2), -1.0)]
    )
    t = torch.cat([t, -t])  # each sum and its negation
    ln_weight, bias = torch.ones(k), torch.zeros(n)
    residual, weight_scale = torch.zeros(rows, n), torch.tensor([0.5])
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, "bitnet_offline", False)
    ref, slack = _float64_offline(
        x, ln_weight, t, bias, residual, weight_scale, "bitnet_offline", False
    )
    assert not slack.any()  # no code at a rounding tie: every sum is exact
    # 127·k, divided by s = 127 / max|h| (h = x normalised: 1 but for eps)
    assert abs(ref.abs().max().item() - 0.5 * k) < 1e-5 * k
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", OFFLINE)
@pytest.mark.parametrize("rows, out_features", [(16, 80), (70, 80)], ids=["decode", "prefill"])
def test_offline_several_tiles_and_k_blocks(backend, mode, rows, out_features):
    """Three 128-wide k blocks, output features past one tile (64) and one decode block (8
    features), rows past one tile: every kernel loop of the CUDA family runs more than once and
    ends on a partial tile."""
    case = _case(rows, torch.float32, False, rows, k=3 * QUANT_PACK_UNIT, n=out_features)
    _check_fp32_offline(backend, case, mode, False)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("mode", OFFLINE)
def test_offline_bf16_within_bf16_rounding(backend, mode, gated):
    """bf16: h is rounded to bf16 (a last-bit difference moves a code anywhere, not only at a
    tie), so the float64 formula runs on the reference's bf16 h, within bf16's tolerance."""
    x, ln_weight, t, bias, residual, weight_scale = _case(16, torch.bfloat16, gated, 5)
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, mode, gated)
    h = quant.bitnet_norm(quant.relu2_glu(x) if gated else x, ln_weight, EPS)
    ref, _ = _float64_offline(x, ln_weight, t, bias, residual, weight_scale, mode, gated, h)
    assert_close(out, ref, RTOL[torch.bfloat16], name="output")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", (3, 40), ids=["few", "tiled"])
def test_offline_nan_row_gives_nan_row(backend, rows):
    """A NaN in a row of x makes that row's max|h|, scale and so every output of the row NaN (as
    transformers' formula gives), and no other row's: an int8 code cannot carry the NaN, so a
    kernel that skipped it in max|h| would return finite numbers for the row."""
    x, ln_weight, t, bias, residual, weight_scale = _case(rows, torch.float32, False, 2)
    x[1, 5] = float("nan")
    with backend.running():
        out = _run(backend, x, ln_weight, t, bias, residual, weight_scale, "bitnet_offline", False)
    assert out[1].isnan().all()
    assert out[[0, *range(2, rows)]].isfinite().all()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gated", [False, True], ids=["x", "relu2_glu"])
@pytest.mark.parametrize("rows", (1, 7))
def test_online_forward_and_every_gradient(backend, gated, rows):
    gen = torch.Generator().manual_seed(rows)
    inputs = {
        "x": randn(2, rows, 2 * K if gated else K, mean=0.3, generator=gen),
        "ln_weight": randn(K, mean=1.0, std=0.2, generator=gen),
        "weight": randn(N, K, std=0.05, generator=gen),
        "bias": randn(N, mean=0.1, generator=gen),
        "residual": randn(2, rows, N, generator=gen),
    }

    def fn(x, ln_weight, weight, bias, residual, backend):
        return ops.ln_linear(
            x, ln_weight, None, weight, bias, eps=EPS, norm="rms", residual=residual,
            input_activation="relu2_glu" if gated else None, alpha=0.8,
            quant="bitnet_online", backend=backend,
        )  # fmt: skip

    with backend.running():
        compare_to_reference(backend, fn, {k: v.to(backend.device) for k, v in inputs.items()})


@pytest.mark.parametrize("backend", _backends())
def test_online_without_norm_leaves_x_alone(backend):
    """With no norm the GEMM operand is x itself: its fake-quantised copy must not overwrite x."""
    gen = torch.Generator().manual_seed(3)
    x = randn(4, K, mean=0.2, generator=gen).to(backend.device)
    weight = randn(N, K, std=0.05, generator=gen).to(backend.device)
    before = x.clone()
    with backend.running():
        out = ops.ln_linear(x, None, None, weight, quant="bitnet_online", backend=backend.name)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    expected = quant.ln_linear_bitnet(x, None, weight)
    torch.testing.assert_close(out, expected)


def test_pack_layout():
    """Byte b of a 128-wide block holds k = 32·i + b at bits 2i (the kernels' layout), unpack
    inverts pack, and transformers' packed BitLinear layout reads back as its ternary weight."""
    gen = torch.Generator().manual_seed(0)
    t = _ternary(5, 2 * QUANT_PACK_UNIT, gen)
    packed = quant.pack(t)
    assert packed.shape == (5, QUANT_PACK_UNIT // 2) and packed.dtype == torch.uint8
    for k in (0, 1, 31, 32, 95, 127, 128, 200, 255):
        blk, i, b = divmod(k, QUANT_PACK_UNIT)[0], (k % QUANT_PACK_UNIT) // 32, k % 32
        codes = (packed[:, 32 * blk + b] >> (2 * i)) & 3
        assert torch.equal(codes.to(torch.int64) - 1, t[:, k].to(torch.int64))
    assert torch.equal(quant.unpack(packed), t)
    transformers = pytest.importorskip("transformers")
    del transformers
    from transformers.integrations.bitnet import pack_weights

    for out_features in (8, 10):
        tt = _ternary(out_features, 7, gen).to(torch.int8)
        hf = pack_weights(tt.clone())
        assert torch.equal(quant.unpack_hf(hf, out_features), tt)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"in_features": 100}, "needs in_features a multiple of 128"),
        ({"weight_dtype": torch.int8}, "weight must have dtype torch.uint8"),
        ({"weight_cols": 16}, "weight must have shape (out_features, 64) for quant="),
        ({"weight_scale": None}, "needs weight_scale, a tensor of shape (1,)"),
        ({"weight_scale": torch.ones(2)}, "weight_scale must have shape (1,), got (2,)"),
        ({"norm": "layer"}, "takes norm='rms' or no norm, input_activation"),
        ({"quant": "int4"}, "quant must be one of 'none', 'bitnet_online'"),
    ],
)
@pytest.mark.parametrize("backend", _backends())
def test_bad_arguments_refused_alike(backend, change, error):
    k = change.get("in_features", K)
    x = randn(3, k)
    weight = torch.zeros(
        N, change.get("weight_cols", k // 4), dtype=change.get("weight_dtype", torch.uint8)
    )
    kwargs = {"quant": change.get("quant", "bitnet_offline")}
    kwargs["weight_scale"] = change.get("weight_scale", torch.ones(1))
    if kwargs["weight_scale"] is not None:
        kwargs["weight_scale"] = kwargs["weight_scale"].to(backend.device)
    with (
        backend.running(),
        pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")),
    ):
        ops.ln_linear(
            x.to(backend.device), torch.ones(k, device=backend.device), None,
            weight.to(backend.device), norm=change.get("norm", "rms"), backend=backend.name,
            **kwargs,
        )  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
def test_weight_scale_checked_online(backend):
    """Online, weight_scale is optional (tensor parallelism gives the whole weight's mean|W|:
    tests/test_tensor_parallel_quant.py) and checked as the offline modes' is; without quant it
    is refused."""
    device = backend.device
    with backend.running(), pytest.raises(ValueError, match=r"must have shape \(1,\), got \(2,\)"):
        ops.ln_linear(
            randn(2, K, device=device), None, None, randn(N, K, device=device),
            quant="bitnet_online", weight_scale=torch.ones(2, device=device), backend=backend.name,
        )  # fmt: skip
    with backend.running(), pytest.raises(ValueError, match="weight_scale must be None"):
        ops.ln_linear(
            randn(2, K, device=device), None, None, randn(N, K, device=device),
            weight_scale=torch.ones(1, device=device), backend=backend.name,
        )  # fmt: skip


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_kernel_backends_run_quant_or_refuse_it(backend):
    """quant.BACKENDS is what the integrations fuse on: a backend in it runs every mode, any
    other must refuse (NotImplementedError), never hand back something else."""
    gen = torch.Generator().manual_seed(2)
    x, ln_weight, t, bias, residual, weight_scale = _case(3, torch.float32, False, 2)
    with backend.running():
        for mode in quant.QUANT_MODES:
            if mode == "bitnet_online":
                weight, scale = randn(N, K, std=0.05, generator=gen), None
            else:
                weight, scale = quant.pack(t), weight_scale

            def call(mode=mode, weight=weight, scale=scale):
                d = backend.device
                return ops.ln_linear(
                    x.to(d), ln_weight.to(d), None, weight.to(d), bias.to(d), norm="rms",
                    quant=mode, weight_scale=None if scale is None else scale.to(d),
                    backend=backend.name,
                )  # fmt: skip

            if backend.name in quant.BACKENDS:
                assert torch.isfinite(call()).all()
            else:
                with pytest.raises(NotImplementedError, match=f"{backend.name} backend"):
                    call()


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0].name == "cuda"])
def test_offline_has_no_backward_on_cuda(backend):
    gen = torch.Generator().manual_seed(1)
    with backend.running():
        x = randn(2, K, generator=gen).to(backend.device).requires_grad_()
        out = ops.ln_linear(
            x, None, None, quant.pack(_ternary(N, K, gen)).to(backend.device),
            quant="bitnet_offline", weight_scale=torch.ones(1, device=backend.device),
            backend="cuda",
        )  # fmt: skip
        with pytest.raises(NotImplementedError, match="has no backward"):
            out.sum().backward()


def test_offline_has_no_backward_on_cpu():
    require_backend("cpu")
    gen = torch.Generator().manual_seed(1)
    x = randn(2, K, generator=gen).requires_grad_()
    out = ops.ln_linear(
        x, None, None, quant.pack(_ternary(N, K, gen)), quant="bitnet_offline",
        weight_scale=torch.ones(1), backend="cpu",
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="has no backward"):
        out.sum().backward()
