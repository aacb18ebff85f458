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
from magneto_kernels.library import get_op

triton_kernels = pytest.importorskip("magneto_kernels.triton")
from magneto_kernels.triton import norm_backward as triton_norm  # noqa: E402
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


@pytest.mark.parametrize("input_activation", ["gelu", "silu", "swiglu"])
def test_input_activation_rounded_to_x_dtype(input_activation):
    """a = in_act(x) is rounded to x's dtype before the norm, where the reference (and the C++
    kernels) form it: the row statistics, h in the forward GEMM and xhat in the norm backward
    are those of the rounded a. Each check also shows that the unrounded a would fail it."""
    rows, k = 64, 64
    width = 2 * k if input_activation == "swiglu" else k
    x = randn(rows, width, dtype=torch.bfloat16, mean=0.5, std=2.0)
    ones, zeros = torch.ones(k), torch.zeros(k)
    eye = torch.eye(k, dtype=torch.bfloat16)  # out = h exactly: one product per output
    # formed in float32 and rounded once (a gated one too, as the C++ kernels form it; the
    # reference's eager product rounds act(gate) first)
    a_rounded = reference.apply_input_activation(x.float(), input_activation).to(x.dtype).double()
    a_exact = reference.apply_input_activation(x.double(), input_activation)
    out, mean, rstd, _ = get_op("ln_linear", "triton")(
        x, ones, zeros, eye, None, None, None, 1e-5, "layer", input_activation, "none", 1.0, 0.0
    )

    def stats(a):
        m = a.mean(-1)
        return m, ((a - m[:, None]) ** 2).mean(-1).add(1e-5).rsqrt()

    for a, matches in ((a_rounded, True), (a_exact, False)):
        m, r = stats(a)
        close = torch.allclose(mean.double(), m, rtol=2e-6, atol=2e-6) and torch.allclose(
            rstd.double(), r, rtol=2e-6
        )
        h = ((a - m[:, None]) * r[:, None]).to(torch.bfloat16)
        same_h = (out != h).double().mean().item() < 0.01
        assert close == matches and same_h == matches, (matches, close, same_h)

    dy = randn(rows, k)
    _, dgamma, _ = triton_norm.norm_backward(
        dy, x, ones, None, mean, rstd, None, "layer", [False, True, False],
        input_activation=input_activation,
    )  # fmt: skip
    for a, matches in ((a_rounded, True), (a_exact, False)):
        m, r = stats(a)
        expected = (dy.double() * (a - m[:, None]) * r[:, None]).sum(0)
        assert torch.allclose(dgamma.double(), expected, rtol=1e-5, atol=1e-5) == matches


def _strided(t, column_step=1):
    """t's values in a tensor with a row stride past its width (and ``column_step`` for a 1-D
    one), NaN in the gaps: a kernel that assumes contiguity reads NaN."""
    if t.dim() == 1:
        big = torch.full((t.shape[0] * column_step,), float("nan"), dtype=t.dtype)
        big[::column_step] = t
        return big[::column_step]
    big = torch.full((t.shape[0], t.shape[1] + 7), float("nan"), dtype=t.dtype)
    big[:, : t.shape[1]] = t
    return big[:, : t.shape[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_take_strides(dtype):
    """Every op of the family on row-strided x, residual and gradients and on strided 1-D
    parameters gives what it gives on contiguous copies, bit for bit."""
    rows, k, n = 19, 40, 24
    x = randn(rows, 2 * k, dtype=dtype, mean=1.0)
    w = randn(n, k, dtype=dtype) * 0.2
    ln_w, ln_b, bias = randn(k, mean=1.0), randn(k), randn(n, dtype=dtype)
    res, dy = randn(rows, n, dtype=dtype), randn(rows, n, dtype=dtype)
    seed = torch.tensor(77, dtype=torch.int64)
    fwd, bwd = get_op("ln_linear", "triton"), get_op("ln_linear_backward", "triton")
    norm_fwd, norm_bwd = get_op("layer_norm", "triton"), get_op("layer_norm_backward", "triton")
    add_norm = get_op("add_layer_norm", "triton")
    for in_act, xk in (("gelu", x[:, :k].contiguous()), ("swiglu", x)):
        calls = [
            lambda s: fwd(
                s(xk),
                s(ln_w, 2),
                s(ln_b, 3),
                w,
                s(bias, 2),
                s(res),
                seed,
                1e-5,
                "layer",
                in_act,
                "silu",
                0.7,
                0.2,
            ),  # fmt: skip
        ]
        out, mean, rstd, preact = calls[0](lambda t, *_: t)
        calls.append(
            lambda s: bwd(
                s(dy),
                s(xk),
                s(ln_w, 2),
                s(ln_b, 2),
                w,
                mean,
                rstd,
                s(preact),
                seed,
                "layer",
                in_act,
                "silu",
                0.2,
                [True] * 5,
            )  # fmt: skip
        )
        for call in calls:
            for got, want in zip(call(_strided), call(lambda t, *_: t)):
                assert torch.equal(got, want)
    x0 = x[:, :k].contiguous()
    y, mean, rstd = norm_fwd(x0, ln_w, ln_b, 1e-5, "layer")
    for call in (
        lambda s: norm_fwd(s(x0), s(ln_w, 3), s(ln_b, 2), 1e-5, "layer"),
        lambda s: add_norm(s(x0), s(x0 * 0.5), s(ln_w, 2), s(ln_b, 2), 1e-5, 0.9, "layer"),
        lambda s: norm_bwd(
            s(y), s(x0), s(ln_w, 2), s(ln_b, 2), mean, rstd, s(x0), "layer", [True] * 3
        ),  # fmt: skip
    ):
        for got, want in zip(call(_strided), call(lambda t, *_: t)):
            assert torch.equal(got, want)


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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_ops_run_on_their_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: every op launches on cuda:1 (its current
    stream) and matches the reference there, forward and gradients."""
    dev = "cuda:1"
    with torch.cuda.device(0):
        cases = {
            "ln_linear": (
                ln_linear_fn("layer", "gelu", "gelu", 0.5, 0.1),
                ln_linear_inputs(
                    19,
                    40,
                    24,
                    "layer",
                    True,
                    True,
                    "fp32",
                    torch.float32,
                    dev,
                    input_activation="gelu",
                ),  # fmt: skip
            ),
            "layer_norm": (
                lambda x, weight, bias, backend: mk.layer_norm(x, weight, bias, backend=backend),
                {
                    "x": randn(19, 40, mean=1.0, device=dev),
                    "weight": randn(40, mean=1.0, device=dev),
                    "bias": randn(40, device=dev),
                },
            ),
            "dropout": (
                lambda x, backend: mk.dropout(x, 0.3, backend=backend),
                {"x": randn(19, 40, mean=1.0, device=dev)},
            ),
        }
        for fn, inputs in cases.values():
            compare_to_reference(TRITON_ON_GPU, fn, inputs)
        assert torch.cuda.current_device() == 0
