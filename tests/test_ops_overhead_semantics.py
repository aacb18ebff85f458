"""The short paths of the public ops behave as the long ones: calls that skip the ops' Autograd
kernel (no gradient wanted), 2-D inputs that are not flattened, the typed calls and when they
leave the call to torch.ops, the op families' Autograd kernels, and torch.compile of an
inference call. Behaviour only; bench/bench_overhead.py times them."""

import pytest
import torch
from harness import require_backend
from torch._subclasses.fake_tensor import FakeTensorMode

import magneto_kernels as mk
from magneto_kernels.backends import FAMILY

pytestmark = pytest.mark.skipif(
    mk.available_backends("cpu")["cpu"] is not None, reason="the cpu backend is not built"
)


def _params(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen) for shape in ((16,), (16,), (24, 16), (24,))]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _calls(x, res, params, backend="cpu"):
    g, b, w, wb = params
    return {
        "layer_norm": lambda: mk.layer_norm(x, g, b, backend=backend),
        "add_layer_norm": lambda: mk.add_layer_norm(x, res, g, b, backend=backend, alpha=1.5),
        "ln_linear": lambda: mk.ln_linear(x, g, b, w, wb, activation="gelu", backend=backend),
    }


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 16), (0, 16)])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_no_grad_path_matches_graph_recording_path(op, shape, backend):
    """The one no-gradient shortcut (csrc/autograd.cpp, for every family) gives what the
    graph-recording path gives, and records nothing."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    with torch.no_grad():
        fast = _calls(x, res, _params(False), backend)[op]()
    recorded = _calls(x, res, _params(True), backend)[op]()
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


class _Log:
    """Records the name of every function a mode sees, then runs it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _record(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _LogFunctions(_Log, torch.overrides.TorchFunctionMode):
    __torch_function__ = _Log._record


class _LogDispatch(_Log, torch.utils._python_dispatch.TorchDispatchMode):
    __torch_dispatch__ = _Log._record


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", [_LogFunctions, _LogDispatch])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_python_modes_see_the_op(op, mode, backend):
    """The ops are called through the extension's typed calls, which make the torch.ops call
    where Python must see it: a torch function mode (e.g. ``with torch.device(...)``) sees the
    op, and a dispatch mode sees it at the dispatcher either way; the results are the same."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(2)
    x, res = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    call = _calls(x, res, _params(False), backend)[op]
    plain = call()
    with mode() as log:
        logged = call()
    assert f"magneto.{op}_{FAMILY[backend]}.default" in log.seen, log.seen
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (plain, logged))):
        assert torch.equal(a, b)


class _Subclass(torch.Tensor):
    """A tensor subclass that counts the torch functions called on it."""

    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_see_the_op():
    """An argument that is a Tensor subclass gets the torch.ops call, so its __torch_function__
    runs; plain tensors get the typed call."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=gen)
    g, b = torch.ones(16), torch.zeros(16)
    _Subclass.calls.clear()
    y = mk.layer_norm(x.as_subclass(_Subclass), g, b, backend="cpu")
    assert "magneto.layer_norm_native.default" in _Subclass.calls
    assert torch.equal(y.as_subclass(torch.Tensor), mk.layer_norm(x, g, b, backend="cpu"))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "ln_linear"])
def test_plain_calls_take_the_typed_call(op, backend, monkeypatch):
    """Plain tensors outside torch.compile reach the op through _C.call_<op>_<family>, with
    and without a graph."""
    from magneto_kernels import _C, ops

    require_backend(backend)
    typed = getattr(_C, f"call_{op}_{FAMILY[backend]}")
    assert ops._ENTRIES[op][backend] is typed
    calls = []
    monkeypatch.setitem(ops._ENTRIES[op], backend, lambda *a: calls.append(op) or typed(*a))
    gen = torch.Generator().manual_seed(3)
    x, res = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    for grad in (False, True):
        _calls(x, res, _params(grad), backend)[op]()
    assert calls == [op, op]


def test_typed_calls_raise_the_ops_errors():
    """torch's error translation, as torch.ops has it: the op's checks raise ValueError, an
    argument of the wrong type or number TypeError."""
    from magneto_kernels import _C

    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="weight must have shape"):
        _C.call_layer_norm_native(x, torch.ones(4), None, 1e-5, "layer")
    with pytest.raises(ValueError, match="residual"):
        _C.call_add_layer_norm_native(x, torch.ones(3, 4), None, None, 1e-5, 1.0, "layer")
    with pytest.raises(TypeError, match="^bias must be a Tensor or None, got int$"):
        _C.call_layer_norm_native(x, None, 3, 1e-5, "layer")
    with pytest.raises(TypeError, match="^norm must be a str, got float$"):
        _C.call_layer_norm_triton(x, None, None, 1e-5, 1.0)
    with pytest.raises(TypeError, match="takes 5 arguments, got 4"):
        _C.call_layer_norm_native(x, None, None, 1e-5)


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


class _NoGradient(torch.autograd.Function):
    """Passes its input on and gives it no gradient (None): what reaches the op before it."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("used", ["y", "sum", "neither"])
def test_add_layer_norm_one_output_reaches_the_loss(backend, used):
    """The Autograd kernels pass an output without a gradient on as undefined (no tensor of
    zeros a call): with only y, only the sum, or neither reaching the loss (x reaching it
    another way), every gradient is the float64 reference's."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(5)
    full = [
        torch.randn(5, 16, generator=gen) + 0.5,
        torch.randn(5, 16, generator=gen),
        torch.randn(16, generator=gen),
        torch.randn(16, generator=gen),
    ]
    dy = torch.randn(5, 16, generator=gen)

    def grads(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in full]
        y, s = mk.add_layer_norm(*leaves, alpha=1.3, backend=backend)
        if used != "y":
            y = _NoGradient.apply(y)
        if used != "sum":
            s = _NoGradient.apply(s)
        loss = (y * dy.to(dtype)).sum() + (s * 2.0).sum() + (leaves[0] * 3.0).sum()
        got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return [g.float() for g in got]

    ours, ref = grads(backend, torch.float32), grads("reference", torch.float64)
    for name, o, r in zip(("x", "residual", "weight", "bias"), ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=name)
    if used == "neither":
        assert torch.equal(ours[0], torch.full_like(ours[0], 3.0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["layer_norm", "ln_linear"])
def test_an_output_without_a_gradient_gives_its_inputs_none(op, backend):
    """An op whose output gets no gradient (None from the function after it) gives its inputs
    none: x's gradient is what reaches it another way, exactly."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 16, generator=gen) + 0.5).requires_grad_()
    params = _params(True)
    out = _calls(x, x, params, backend)[op]()
    loss = _NoGradient.apply(out).sum() + (x * 3.0).sum()
    got = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    assert torch.equal(got[0], torch.full_like(x, 3.0))
    assert all(g is None for g in got[1:])
