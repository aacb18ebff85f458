"""The comparison helpers can fail: one element wrong by O(1) in a 128×128 bf16 output passes a
norm-wise bound (‖err‖ = 1 against 1e-2·‖ref‖ ≈ 1.3) and must fail the element-wise one."""

import pytest
import torch
from harness import assert_close, assert_close_to_reference, randn

from magneto_kernels import reference


def _layer_norm_outputs(dtype):
    torch.manual_seed(0)
    x = randn(128, 128, dtype=torch.float64, mean=3.0, std=2.0, device="cpu")
    weight = randn(128, dtype=torch.float64, mean=1.0, std=0.3, device="cpu")
    ref64 = reference.layer_norm(x, weight, None, 1e-5)
    same = reference.layer_norm(x.to(dtype), weight.to(dtype), None, 1e-5)
    return ref64, same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_wrong_element_fails(dtype):
    ref64, same = _layer_norm_outputs(dtype)
    out = same.clone()
    assert_close_to_reference(out, ref64, same, "unchanged")  # the check passes as is
    out[77, 31] += 1.0
    # In bf16 the norm-wise bound alone lets it through: the element-wise one must catch it
    # (in fp16 and fp32 both do; the norm-wise one fails first).
    element_wise = r"max\|out-ref\|.*at \(77, 31\)"
    if dtype == torch.bfloat16:
        assert (out.double() - ref64).norm().item() <= 1e-2 * ref64.norm().item()
    with pytest.raises(AssertionError, match=element_wise if dtype == torch.bfloat16 else ""):
        assert_close_to_reference(out, ref64, same, "one wrong element")
    with pytest.raises(AssertionError, match=element_wise):
        assert_close(out, ref64, rtol=1e-2)


def test_elementwise_bound_scales_with_torch_error():
    """An element off by a few ulps of bf16 at the largest value passes: the bound is not so
    tight that a kernel summing in another order fails."""
    ref64, same = _layer_norm_outputs(torch.bfloat16)
    out = same.clone()
    i = ref64.abs().flatten().argmax()
    out.view(-1)[i] = (ref64.view(-1)[i] * (1 + 2**-8)).to(out.dtype)
    assert_close_to_reference(out, ref64, same, "an ulp off")


def test_non_finite_element_fails():
    ref64, same = _layer_norm_outputs(torch.float32)
    out = same.clone()
    out[3, 5] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference(out, ref64, same, "nan")
