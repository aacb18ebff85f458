"""The short paths of the public ops behave as the long ones: calls that skip the ops' Autograd
kernel (no gradient wanted), 2-D inputs that are not flattened, the op families' own Autograd
kernels, and torch.compile of an inference call. Behaviour only; bench/bench_overhead.py times
them."""

import pytest
import torch
from harness import require_backend
from torch._subclasses.fake_tensor import FakeTensorMode

import magneto_kernels as mk

pytestmark = pytest.mark.skipif(
    mk.available_backends("cpu")["cpu"] is not None, reason="the cpu backend is not built"
)


def _params(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen) for shape in ((16,), (16,), (24, 16), (24,))]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _calls(x, res, params):
    g, b, w, wb = params
    return {
        "layer_norm": lambda: mk.layer_norm(x, g, b, backend="cpu"),
        "add_layer_norm": lambda: mk.add_layer_norm(x, res, g, b, backend="cpu", alpha=1.5),
        "ln_linear": lambda: mk.ln_linear(x, g, b, w, wb, activation="gelu", backend="cpu"),
    }


@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 16), (0, 16)])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_no_grad_path_matches_graph_recording_path(op, shape):
    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    with torch.no_grad():
        fast = _calls(x, res, _params(False))[op]()
    recorded = _calls(x, res, _params(True))[op]()
    fast = fast if isinstance(fast, tuple) else (fast,)
    recorded = recorded if isinstance(recorded, tuple) else (recorded,)
    for f, r in zip(fast, recorded):
        assert f.shape == r.shape and f.shape[:-1] == shape[:-1]
        assert f.grad_fn is None and not f.requires_grad
        assert r.requires_grad and r.grad_fn is not None
        torch.testing.assert_close(f, r.detach(), rtol=0, atol=0)


def test_grad_enabled_without_grad_inputs_records_nothing():
    x = torch.randn(4, 16)
    out = _calls(x, x, _params(False))["ln_linear"]()
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():
        assert _calls(x, x, _params(False))["ln_linear"]().shape == (4, 24)


def test_gradients_flow_to_x_only():
    x = torch.randn(2, 3, 16, requires_grad=True)
    g, b, w, wb = _params(False)
    out = mk.ln_linear(x, g, b, w, wb, activation="gelu", backend="cpu")
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    xr = x.detach().double().requires_grad_()
    ref = mk.ln_linear(
        xr, g.double(), b.double(), w.double(), wb.double(), activation="gelu", backend="reference"
    )
    (dx_ref,) = torch.autograd.grad(ref.square().sum(), xr)
    torch.testing.assert_close(dx, dx_ref.float(), rtol=1e-4, atol=1e-4)


def test_fake_tensors_take_the_no_grad_path():
    with FakeTensorMode():
        x = torch.empty(2, 3, 16)
        with torch.no_grad():
            out = _calls(x, x, _params(False))["ln_linear"]()
    assert out.shape == (2, 3, 24)


class _LogFunctions(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _LogDispatch(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [_LogFunctions, _LogDispatch])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_python_modes_see_the_op(op, mode):
    """The native ops are called through the extension's typed calls (ops._DIRECT) only where
    that changes nothing: a torch function mode (e.g. ``with torch.device(...)``) or a tensor
    subclass with __torch_function__ gets the torch.ops call, and a dispatch mode sees the op at
    the dispatcher either way; the results are the same."""
    gen = torch.Generator().manual_seed(2)
    x, res = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    call = _calls(x, res, _params(False))[op]
    plain = call()
    with mode() as log:
        logged = call()
    assert f"magneto.{op}_native.default" in log.seen, log.seen
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (plain, logged))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_plain_calls_take_the_typed_call(op, monkeypatch):
    """Plain tensors outside torch.compile reach the op through _C.call_<op> (ops._DIRECT), with
    and without a graph."""
    from magneto_kernels import ops

    calls = []
    direct = ops._DIRECT[op]
    monkeypatch.setitem(ops._DIRECT, op, lambda *args: calls.append(op) or direct(*args))
    gen = torch.Generator().manual_seed(3)
    x, res = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    for grad in (False, True):
        _calls(x, res, _params(grad))[op]()
    assert calls == [op, op]


def test_typed_calls_raise_the_ops_errors():
    """torch's error translation, as torch.ops has it: the op's checks raise ValueError."""
    from magneto_kernels import _C

    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="weight must have shape"):
        _C.call_layer_norm(x, torch.ones(4), None, 1e-5, "layer")
    with pytest.raises(ValueError, match="residual"):
        _C.call_add_layer_norm(x, torch.ones(3, 4), None, None, 1e-5, 1.0, "layer")


def test_compile_inference_fullgraph_matches_eager():
    x = torch.randn(2, 3, 16)
    params = _params(False)

    def block(x):
        y, s = mk.add_layer_norm(x, x, *params[:2], backend="cpu")
        return (
            mk.ln_linear(y, *params, backend="cpu")
            + mk.layer_norm(s, *params[:2], backend="cpu").sum()
        )

    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


# Which arguments a call passes (absent optionals shift the autograd edges of the ones after
# them) and which gradients it asks for: each family's Autograd kernel must map every gradient
# to its own argument.
_LN_LINEAR_CASES = [
    # present optionals, wanted gradients
    (
        ("ln_weight", "ln_bias", "bias", "residual"),
        ("x", "ln_weight", "ln_bias", "weight", "bias", "residual"),
    ),
    (("bias", "residual"), ("weight", "residual")),
    (("ln_weight", "residual"), ("residual", "ln_weight")),
    (("ln_weight", "ln_bias"), ("ln_bias", "weight")),
    (("residual",), ("residual",)),
    ((), ("x",)),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("present,wanted", _LN_LINEAR_CASES)
def test_ln_linear_partial_gradients_reach_their_arguments(backend, present, wanted):
    require_backend(backend)
    gen = torch.Generator().manual_seed(2)
    full = {
        "x": torch.randn(5, 16, generator=gen) + 0.5,
        "ln_weight": torch.randn(16, generator=gen),
        "ln_bias": torch.randn(16, generator=gen),
        "weight": torch.randn(12, 16, generator=gen),
        "bias": torch.randn(12, generator=gen),
        "residual": torch.randn(5, 12, generator=gen),
    }
    args = {k: v for k, v in full.items() if k in ("x", "weight") or k in present}
    dy = torch.randn(5, 12, generator=gen)

    def grads(tensors, backend):
        leaves = {k: v.clone().requires_grad_(k in wanted) for k, v in tensors.items()}
        x, weight = leaves.pop("x"), leaves.pop("weight")
        out = mk.ln_linear(
            x,
            weight=weight,
            alpha=0.7,
            backend=backend,
            **leaves,
            **{k: None for k in ("ln_weight", "ln_bias") if k not in leaves},
        )
        named = {"x": x, "weight": weight, **leaves}
        got = torch.autograd.grad(out, [named[k] for k in wanted], dy.to(out.dtype))
        return dict(zip(wanted, got))

    ours = grads(args, backend)
    ref = grads({k: v.double() for k, v in args.items()}, "reference")
    for name in wanted:
        torch.testing.assert_close(ours[name], ref[name].float(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize(
    "with_bias,wanted",
    [
        (with_bias, wanted)
        for with_bias in (True, False)
        for wanted in (("x",), ("residual",), ("weight",), ("x", "residual", "bias"))
        if with_bias or "bias" not in wanted
    ],
)
def test_add_layer_norm_partial_gradients_reach_their_arguments(backend, with_bias, wanted):
    require_backend(backend)
    gen = torch.Generator().manual_seed(3)
    full = {
        "x": torch.randn(5, 16, generator=gen) + 0.5,
        "residual": torch.randn(5, 16, generator=gen),
        "weight": torch.randn(16, generator=gen),
        "bias": torch.randn(16, generator=gen) if with_bias else None,
    }
    dy, ds = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)

    def grads(backend, dtype):
        leaves = {
            k: None if v is None else v.to(dtype).requires_grad_(k in wanted)
            for k, v in full.items()
        }
        y, s = mk.add_layer_norm(*leaves.values(), alpha=1.3, backend=backend)
        # Both outputs' gradients (s's joins the kernel's), as one scalar: the reference's s
        # records no graph when only the norm's parameters want a gradient.
        loss = (y * dy.to(dtype)).sum() + (s * ds.to(dtype)).sum()
        got = torch.autograd.grad(loss, [leaves[k] for k in wanted])
        return dict(zip(wanted, got))

    ours, ref = grads(backend, torch.float32), grads("reference", torch.float64)
    for name in wanted:
        torch.testing.assert_close(ours[name], ref[name].float(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("grad", [False, True])
def test_outputs_of_leading_dimensions_are_plain_tensors(backend, grad):
    """The ops take (*, features) and give outputs of x's leading dimensions: tensors of their
    own, not views of a kernel buffer, so that in-place updates of them (a residual stream
    updated with add_) work as on eager outputs, with and without a graph."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(4)
    x, res = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    g, b, w, wb = _params(grad)
    outs = [
        mk.layer_norm(x, g, b, backend=backend),
        *mk.add_layer_norm(x, res, g, b, backend=backend),
        mk.ln_linear(x, g, b, w, wb, activation="gelu", backend=backend),
    ]
    for out in outs:
        assert out.shape[:-1] == (2, 3) and not out._is_view()
        out.mul_(2.0)  # raises for an output view of a custom autograd function


_BAD_CALLS = {
    "layer_norm weight shape": (
        lambda be: mk.layer_norm(torch.randn(4, 8), torch.randn(7), None, backend=be),
        ValueError,
        r"weight must have shape \(8,\), got \(7,\)",
    ),
    "layer_norm weight type": (
        lambda be: mk.layer_norm(torch.randn(4, 8), [1.0] * 8, None, backend=be),
        TypeError,
        "weight must be a Tensor or None, got list",
    ),
    "add_layer_norm residual": (
        lambda be: mk.add_layer_norm(
            torch.randn(2, 4, 8), torch.randn(4, 2, 8), None, None, backend=be
        ),
        ValueError,
        r"residual must have shape \(2, 4, 8\), got \(4, 2, 8\)",
    ),
    "ln_linear weight dtype": (
        lambda be: mk.ln_linear(
            torch.randn(4, 8), None, None, torch.randn(5, 8, dtype=torch.float64), backend=be
        ),
        ValueError,
        r"weight must have dtype in \(torch.float32,\), got torch.float64",
    ),
    "ln_linear residual": (
        lambda be: mk.ln_linear(
            torch.randn(2, 3, 8),
            None,
            None,
            torch.randn(5, 8),
            residual=torch.randn(3, 2, 5),
            backend=be,
        ),
        ValueError,
        r"residual must have shape \(2, 3, 5\), got \(3, 2, 5\)",
    ),
    "ln_linear norm": (
        lambda be: mk.ln_linear(
            torch.randn(4, 8), torch.ones(8), None, torch.randn(5, 8), norm="none", backend=be
        ),
        ValueError,
        "norm must be 'layer' or 'rms', got 'none'",
    ),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_arguments_get_the_public_message_on_every_backend(backend, case):
    """The cpu backend's op checks the arguments itself and the public function checks them
    only when the op refuses a call: the error is still the public function's own."""
    require_backend(backend)
    call, error, message = _BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(backend)
