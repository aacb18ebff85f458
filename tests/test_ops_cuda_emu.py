"""The CUDA kernels executed on the CPU (csrc/cuda_emu; MAGNETO_CUDA_EMULATE=1 before import,
magneto_kernels._C_emu built with MAGNETO_BUILD_CUDA_EMU=1): the emulation's own semantics
(shuffle masks and widths, launches it must refuse, round-to-nearest-even 16-bit conversions)
and the kernel paths the shared op suite (tests/test_ops.py, the cuda row) reaches only with
GPU-sized inputs, here at sizes the emulation runs in seconds.

    MAGNETO_CUDA_EMULATE=1 python3 -m pytest -q tests/test_ops_cuda_emu.py
    MAGNETO_CUDA_EMULATE=1 python3 -m pytest -q tests/test_ops.py -k cuda
"""

import pytest
import torch
from harness import BY_NAME, DTYPES, check_ln_linear_case, compare_to_reference, norm_inputs, randn

import magneto_kernels as mk
from magneto_kernels.backends import EMULATED_CUDA

CUDA = BY_NAME["cuda"]

pytestmark = pytest.mark.skipif(
    not EMULATED_CUDA or CUDA.problem() is not None,
    reason="needs MAGNETO_CUDA_EMULATE=1 and magneto_kernels._C_emu "
    f"({CUDA.problem() if EMULATED_CUDA else 'MAGNETO_CUDA_EMULATE is not 1'})",
)


@pytest.fixture
def cuda():
    with CUDA.running() as b:
        torch.manual_seed(0)
        yield b


# ------------------------------------------------------------------------------ the emulation


def test_cpu_tensors_run_the_emulated_build():
    from magneto_kernels import _C

    assert _C.emulated_cuda.__name__ == "magneto_kernels._C_emu"
    assert mk.available_backends("cpu")["cpu"] is not None  # _C_emu holds the CPU key now


def test_shuffle_masks_and_widths():
    out = torch.ops.magneto_emu.kernel_self_test("shuffles").view(5, 64)
    t = torch.arange(64)
    lane = t % 32

    def within(width, src):  # CUDA: a source outside the caller's width segment reads its own
        return torch.where(src // width == lane // width, src, lane)

    assert out[0].tolist() == (lane ^ 5).tolist()
    assert out[1].tolist() == within(16, lane + 3).tolist()
    assert out[2].tolist() == torch.where(lane % 8 >= 2, lane - 2, lane).tolist()
    assert out[3].tolist() == (lane // 16 * 16 + 7).tolist()
    assert out[4].tolist() == torch.where(lane < 16, lane ^ 1, lane ^ 2).tolist()


@pytest.mark.parametrize(
    "kernel, message",
    [
        (
            "barrier_in_branch",
            (
                r"__syncthreads at self_test\.cpp:\d+ in divergent code: reached by "
                r"16 of 64 threads"
            ),
        ),
        ("barriers_at_two_sites", r"wait at different __syncthreads"),
        (
            "shuffle_in_branch",
            (
                r"shuffle at self_test\.cpp:\d+ in divergent code: warp 0 .* lanes "
                r"16,.*,31 never reach it \(exited: 16"
            ),
        ),
        ("shuffle_outside_mask", r"lane 16 reads lane 17, which is not in the mask"),
    ],
)
def test_divergent_launches_are_reported(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.magneto_emu.kernel_self_test(kernel)


def _float_samples():
    """Normals, subnormals and the values either side of every rounding tie of float16 and
    bfloat16, plus the specials."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (200000,), generator=g, dtype=torch.int64)
    bits = torch.cat([bits, bits | (1 << 31)]).to(torch.int32)
    x = bits.view(torch.float32)
    ties = torch.cat(
        [
            torch.arange(-2048, 2048, dtype=torch.float32) * 2.0**-24 + 2.0**-25,
            torch.arange(1, 4096, dtype=torch.float32) + 0.5,
            torch.tensor([65504.0, 65519.0, 65520.0, 65536.0, 1e30, 6e-8, 3e-8]),
        ]
    )
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    return torch.cat([x[torch.isfinite(x)], ties, -ties, specials])


def test_float16_and_bfloat16_round_to_nearest_even():
    x = _float_samples()
    assert torch.equal(
        torch.ops.magneto_emu.half_bits(x), x.half().view(torch.int16).to(torch.int32) & 0xFFFF
    )
    assert torch.equal(
        torch.ops.magneto_emu.bfloat16_bits(x),
        x.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF,
    )
    nan = torch.tensor([float("nan")])
    assert torch.ops.magneto_emu.half_bits(nan).item() & 0x7C00 == 0x7C00
    assert torch.ops.magneto_emu.bfloat16_bits(nan).item() & 0x7F80 == 0x7F80


def test_dp4a_is_the_wrapped_sum_of_signed_byte_products():
    """The quantised GEMMs' __dp4a: every byte value on each side (the extremes -128 and 127
    included) and accumulators near the int32 limits, against int64 arithmetic wrapped to int32."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    a = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=gen)
    b = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=gen)
    a[:256] = torch.arange(256) * 0x01010101  # every byte value, in every byte
    b[:2] = torch.tensor([0x80808080, 0x7F7F7F7F])  # -128 and 127 in every byte
    c = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=gen)
    c[:8] = torch.tensor([2**31 - 1, -(2**31), 2**31 - 100, -(2**31) + 100, 0, -1, 1, 65536])

    def wrap(v):
        return (v + 2**31) % 2**32 - 2**31

    def signed_bytes(v):
        shifts = torch.arange(4, dtype=torch.int64) * 8
        return ((v[:, None] >> shifts) & 0xFF).to(torch.uint8).view(torch.int8).to(torch.int64)

    expected = wrap(c + (signed_bytes(a) * signed_bytes(b)).sum(1))
    a, b, c = wrap(a).to(torch.int32), wrap(b).to(torch.int32), wrap(c).to(torch.int32)
    assert torch.equal(torch.ops.magneto_emu.dp4a(a, b, c), expected.to(torch.int32))


# ------------------------------------------------------------------ kernel paths, small inputs


def _layer_norm(norm):
    return lambda x, weight, bias, backend: mk.layer_norm(
        x, weight, bias, norm=norm, backend=backend
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_more_rows_than_the_backward_grid(cuda, norm, dtype):
    # 600 rows of 40: 75 blocks of 8 row groups wanted, 16 resident on the emulated device's two
    # SMs, so every block of norm_backward_rows loops over rows and carries its column partials.
    compare_to_reference(cuda, _layer_norm(norm), norm_inputs(600, 40, dtype, norm, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows_take_the_scalar_path(cuda, dtype):
    # Contiguous, but starting one element past a 16-byte boundary: vec_ok is false although
    # the width (64) is a whole number of vectors.
    inputs = norm_inputs(9, 64, dtype, "layer", "cpu")
    flat = torch.empty(9 * 64 + 1, dtype=dtype)
    inputs["x"] = flat[1:].view(9, 64).copy_(inputs["x"])
    assert inputs["x"].data_ptr() % 16 != 0
    compare_to_reference(cuda, _layer_norm("layer"), inputs)


# ln_linear with in_features past the register kernels (fp32 16384, 16-bit 32768 in forward;
# 8192 in backward): the prologue's Welford kernel with its runtime input activation and the
# wide backward kernels. Two rows keep the emulated launches short.
WIDE_K = {torch.float32: 16390, torch.bfloat16: 32770, torch.float16: 32770}
# (norm, input_activation, activation, residual alpha or None, dropout_p, bias)
WIDE_COMBOS = [
    ("layer", "gelu", "none", 1.0, 0.0, True),
    ("rms", "silu", "gelu_tanh", 0.5, 0.2, False),
    ("layer", "swiglu", "none", None, 0.0, True),  # the gated Welford and wide-dx kernels
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combo", WIDE_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_ln_linear_wide_in_features(cuda, combo, dtype):
    check_ln_linear_case(cuda, (2, WIDE_K[dtype], 8, *combo, "same"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_welford_rows(cuda, dtype):
    cols = WIDE_K[dtype]
    x = randn(3, cols, dtype=dtype, mean=2.0, device="cpu")
    residual = randn(3, cols, dtype=dtype, mean=-1.0, device="cpu")
    weight = randn(cols, dtype=dtype, mean=1.0, std=0.3, device="cpu")
    bias = randn(cols, dtype=dtype, std=0.3, device="cpu")
    compare_to_reference(
        cuda,
        lambda x, residual, weight, bias, backend: mk.add_layer_norm(
            x, residual, weight, bias, alpha=0.7, backend=backend
        ),
        {"x": x, "residual": residual, "weight": weight, "bias": bias},
    )
