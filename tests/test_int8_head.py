"""magneto_kernels.int8_head, the int8 output projection y = (x @ q.T)·s (+ b): the CPU kernel
(csrc/cpu/int8_head.h, whichever instruction-set build runs: the Makefile's ISA stages run this
file under each) against a float64 evaluation of the formula, judged against PyTorch's own error
in the same dtype (F.linear on q cast to x's dtype, then ·s + b), on fresh non-zero-mean inputs
with poisoned outputs; thread-count independence; the fake impl; the errors of the C++ checks
and of checks.py, word for word the same."""

import pytest
import torch
import torch.nn.functional as F
from harness import BY_NAME, assert_close_to_reference, randn, require_backend

from magneto_kernels import checks, int8_head, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(rows, k, n, dtype, bias, seed, lead=()):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*lead, rows, k, dtype=dtype, mean=0.5, std=1.0, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = randn(n, dtype=dtype, mean=0.02, std=0.005, generator=gen).abs()
    b = randn(n, dtype=dtype, mean=0.3, std=0.5, generator=gen) if bias else None
    return x, q, s, b


def _check(x, q, s, b, name):
    with BY_NAME["cpu"].running():  # skips without the extension; NaN-poisons the output
        out = int8_head(x, q, s, b)
    ref64 = reference.int8_head(x.double(), q, s.double(), None if b is None else b.double())
    same = F.linear(x, q.to(x.dtype)) * s
    same = same if b is None else same + b
    assert_close_to_reference(out, ref64, same, name)


# K = 5 (less than one vector), 70 (four 16-wide vectors and a tail; eight 8-wide and a tail);
# N = 37 (nine 4-feature tiles and one feature alone).
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("k", (5, 70))
@pytest.mark.parametrize("rows", (1, 3, 16, 17, 64))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_head_cpu_against_float64(dtype, rows, k, bias):
    x, q, s, b = _inputs(rows, k, 37, dtype, bias, seed=rows * 100 + k)
    _check(x, q, s, b, f"int8_head {dtype} rows={rows} k={k}")


def test_int8_head_cpu_leading_dims_and_strided_x():
    """x (2, 3, K) sliced from a wider tensor: the rows are all the leading dimensions."""
    x, q, s, b = _inputs(3, 140, 37, torch.bfloat16, True, seed=7, lead=(2,))
    _check(x[..., ::2], q[:, :70], s, b, "int8_head (2, 3, K) strided")


def test_int8_head_cpu_threads_do_not_change_the_result():
    x, q, s, b = _inputs(17, 300, 203, torch.bfloat16, True, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_head(x, q, s, b)
        torch.set_num_threads(2)
        two = int8_head(x, q, s, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_int8_head_cpu_fake_shape():
    x, q, s, b = (t.to("meta") for t in _inputs(3, 8, 5, torch.float16, True, seed=1, lead=(2,)))
    out = int8_head(x, q, s, b)
    assert out.shape == (2, 3, 5) and out.dtype == torch.float16 and out.device.type == "meta"


def _bad_cases():
    x, q, s, b = _inputs(2, 8, 5, torch.bfloat16, True, seed=2)
    return {
        "x float64": ((x.double(), q, s, b), TypeError),
        "x scalar": ((x[0, 0], q, s, b), ValueError),
        "weight float": ((x, q.float(), s, b), TypeError),
        "weight width": ((x, q[:, :7], s, b), ValueError),
        "weight 1-d": ((x, q[0], s, b), ValueError),
        "scale shape": ((x, q, s[:4], b), ValueError),
        "scale dtype": ((x, q, s.float(), b), TypeError),
        "bias shape": ((x, q, s, b[None]), ValueError),
        "bias dtype": ((x, q, s, b.half()), TypeError),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_int8_head_cpu_bad_inputs(case):
    """The CPU kernel's checks and checks.py (the reference's, on every other device) refuse
    the same calls with the same error."""
    args, error = _bad_cases()[case]
    with pytest.raises(error) as python:
        checks.check_int8_head(*args)
    require_backend("cpu")  # the Python checks above run without the extension too
    with pytest.raises(error) as cpp:
        int8_head(*args)
    assert str(cpp.value).splitlines()[0] == str(python.value)


def test_int8_head_cpu_has_no_backward():
    x, q, s, b = _inputs(2, 8, 5, torch.float32, True, seed=4)
    y = int8_head(x.requires_grad_(), q, s, b)
    with pytest.raises(RuntimeError, match="magneto::int8_head has no backward"):
        y.sum().backward()
