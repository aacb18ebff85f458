"""What only the Triton backend (``backend="triton"``) has; tests/test_ops.py runs the op suite
on it (on CPU under TRITON_INTERPRET=1): the Philox stream for 64-bit indices, saved-tensor
bytes, torch.compile, and on a GPU the compiled Philox, real sizes and tf32.
"""

import dataclasses

import pytest
import torch
from harness import (
    BY_NAME,
    DTYPES,
    check_ln_linear_case,
    compare_to_reference,
    ln_linear_fn,
    ln_linear_inputs,
    randn,
)

import magneto_kernels as mk
from magneto_kernels import reference

triton_kernels = pytest.importorskip("magneto_kernels.triton")
from magneto_kernels.triton import norm as triton_norm  # noqa: E402
from magneto_kernels.triton import philox as triton_philox  # noqa: E402

TRITON = BY_NAME["triton"]
TRITON_ON_GPU = dataclasses.replace(TRITON, device="cuda", gpu=True)


@pytest.fixture(autouse=True)
def poison_outputs(request):
    gpu = request.node.get_closest_marker("gpu") is not None
    with (TRITON_ON_GPU if gpu else TRITON).running():
        yield


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("seed", [0, 1234567, 2**62 - 3, 2**40 + 17])
def test_philox_matches_reference_for_64_bit_indices(seed):
    seed_t = torch.tensor(seed, dtype=torch.int64)
    index = torch.cat(
        [
            torch.arange(0, 3000, dtype=torch.int64),
            torch.tensor(
                [
                    2**31 - 1,
                    2**31,
                    2**32 - 1,
                    2**32,
                    2**32 + 1,
                    2**33 + 12345,
                    2**45 + 7,
                    2**62 + 99,
                ],
                dtype=torch.int64,
            ),
        ]
    )
    ours = triton_philox.philox(seed_t, index)
    assert torch.equal(ours, reference.philox(seed_t, index))
    assert ours.unique().numel() > 2900  # a real stream, not a constant


# ------------------------------------------------------------------------------------ ln_linear


@pytest.mark.parametrize("act,p", [("none", 0.0), ("gelu", 0.0), ("none", 0.1), ("silu", 0.1)])
def test_ln_linear_saved_tensor_bytes(act, p):
    """Autograd keeps x, the row stats and the weights, plus u only with an output activation
    and the 8-byte seed only with dropout: never normalised copies, masks or activations."""
    rows, k, n = 11, 24, 16
    dtype = torch.bfloat16
    inputs = ln_linear_inputs(rows, k, n, "layer", True, True, "fp32", dtype, TRITON.device)
    params = [leaf(t) for t in inputs.values()]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mk.ln_linear(
            *params[:5],
            residual=params[5],
            activation=act,
            dropout_p=p,
            alpha=0.5,
            backend="triton",
        )
    expected = (
        rows * k * 2  # x (bf16)
        + 2 * rows * 4  # mean and rstd (fp32)
        + 2 * k * 4  # ln_weight and ln_bias (fp32)
        + n * k * 2  # weight (bf16)
        + (rows * n * 2 if act != "none" else 0)  # pre-activation u
        + (8 if p > 0 else 0)
    )  # the dropout seed
    assert sum(saved) == expected, (saved, expected)
    y.sum().backward()
    assert all(t.grad is not None for t in params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_norm_backward_chunked_from_half_width(dtype):
    """A gated row goes chunked in the norm backward from half MAX_FUSED_WIDTH_BACKWARD on
    (norm.backward_row_block): in_features 3000 has one-block statistics, a chunked backward."""
    assert triton_norm.backward_row_block(3000, gated=True)[1] is False
    assert triton_norm.backward_row_block(3000, gated=False)[1] is True
    check_ln_linear_case(
        TRITON, (3, 3000, 5, "rms", "swiglu", "none", 0.7, 0.0, True, "fp32"), dtype
    )


# --------------------------------------------------------------------------- registration/compile


def test_torch_compile_fullgraph_forward_and_backward():
    def block(x, ln_w, ln_b, w1, w2, g2):
        h = mk.layer_norm(x, ln_w, ln_b, backend="triton")
        u = mk.ln_linear(h, ln_w, ln_b, w1, backend="triton")
        y = mk.ln_linear(
            u,
            g2,
            None,
            w2,
            norm="rms",
            input_activation="gelu",
            residual=x,
            alpha=0.9,
            backend="triton",
        )
        out, s = mk.add_layer_norm(y, x, ln_w, ln_b, backend="triton")
        return out + s

    inputs = [
        randn(2, 5, 16, mean=1.0),
        randn(16, mean=1.0),
        randn(16),
        randn(16, 16) * 0.3,
        randn(16, 16) * 0.3,
        randn(16, mean=1.0),
    ]
    eager_in = [leaf(t) for t in inputs]
    comp_in = [leaf(t) for t in inputs]
    expected = block(*eager_in)
    expected.sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(*comp_in)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
def test_gpu_philox_and_dropout_mask_match_reference():
    """The compiled Philox (uint32 multiply-high on the GPU) draws the reference's bits."""
    seed = torch.tensor(2**62 - 12345, dtype=torch.int64, device="cuda")
    index = torch.cat(
        [
            torch.arange(0, 1 << 20, dtype=torch.int64, device="cuda"),
            torch.tensor([2**32 - 1, 2**32, 2**40 + 3], device="cuda"),
        ]
    )
    assert torch.equal(triton_philox.philox(seed, index), reference.philox(seed, index))
    x = randn(300, 64, mean=1.0, device="cuda")
    w = randn(500, 64, device="cuda")
    torch.manual_seed(11)
    y = mk.ln_linear(x, None, None, w, dropout_p=0.25, backend="triton")
    torch.manual_seed(11)
    keep = reference.dropout_mask(
        torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda"), (300, 500), 0.25
    )
    assert torch.equal(y != 0, keep)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ln_linear_real_size(dtype):
    """Real shapes on the GPU (bf16/fp16 tensor-core dot), forward and backward."""
    inputs = ln_linear_inputs(4096, 1024, 3072, "layer", True, True, "fp32", dtype, "cuda")
    compare_to_reference(
        TRITON_ON_GPU, ln_linear_fn("layer", "none", "gelu", 1.0, 0.1), inputs, seed=3
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,input_activation", [("rms", "relu2_glu"), ("layer", "swiglu")])
def test_gpu_ln_linear_gated_real_size(dtype, norm, input_activation):
    """A down projection's shapes with a gated input activation (x = [gate | up], 2·3072
    wide): the two-half loads in the GEMMs and the chunked gated norm backward."""
    inputs = ln_linear_inputs(
        4096,
        3072,
        1024,
        norm,
        True,
        False,
        "fp32",
        dtype,
        "cuda",
        input_activation=input_activation,
    )
    compare_to_reference(
        TRITON_ON_GPU, ln_linear_fn(norm, input_activation, "none", 1.0, 0.0), inputs, seed=5
    )


@pytest.mark.gpu
@pytest.mark.parametrize("precision,rtol", [("highest", 1e-5), ("high", 5e-4)])
def test_gpu_fp32_ieee_and_tf32(precision, rtol):
    """fp32 follows torch.set_float32_matmul_precision: "highest" → ieee, "high" → tf32."""
    inputs = ln_linear_inputs(1024, 512, 768, "layer", False, True, "fp32", torch.float32, "cuda")
    x, ln_w, ln_b, w, b = (inputs[k] for k in ("x", "ln_weight", "ln_bias", "weight", "bias"))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y = mk.ln_linear(x, ln_w, ln_b, w, b, backend="triton")
    finally:
        torch.set_float32_matmul_precision(old)
    ref = reference.ln_linear(x.double(), ln_w.double(), ln_b.double(), w.double(), b.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= rtol, err
    if precision == "high":
        assert err > 1e-6, "tf32 path looks exact: is input_precision reaching tl.dot?"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_layer_norm_real_size(dtype):
    inputs = dict(
        x=randn(8192, 4096, dtype=dtype, mean=1.0, device="cuda"),
        weight=randn(4096, mean=1.0, device="cuda"),
        bias=randn(4096, device="cuda"),
    )
    compare_to_reference(
        TRITON_ON_GPU,
        lambda x, weight, bias, backend: mk.layer_norm(x, weight, bias, backend=backend),
        inputs,
    )
