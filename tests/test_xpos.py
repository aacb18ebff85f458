"""magneto.xpos against torchscale 0.3.0's XPOS, side by side on the same tensors: float32
forward and gradient bit for bit, bf16 within bf16's rounding of a float64 evaluation, at offset
0 and at decoding offsets."""

import pytest
import torch
from harness import assert_close_to_reference, randn
from torchscale.component.xpos_relative_position import XPOS

from magneto.xpos import apply_xpos, apply_xpos_qk, xpos_scale

CASES = [  # (batch·heads, length, head_dim, offset, scale_base)
    (6, 7, 8, 0, 512),
    (6, 7, 8, 5, 512),
    (4, 1, 16, 12, 512),  # one decoding step, 13 positions in all
    (3, 9, 16, 3, 8),  # a small scale_base makes the scale far from 1
    (2, 10, 32, 31, 16),
]


def _ids(case):
    return "bh{}-len{}-d{}-off{}-base{}".format(*case)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("downscale", [False, True], ids=["q", "k"])
def test_float32_forward_and_gradient_are_torchscales(case, downscale):
    bh, length, head_dim, offset, base = case
    x = randn(bh, length, head_dim, mean=0.5).requires_grad_()
    ours = apply_xpos(x, offset, downscale=downscale, scale_base=base)
    x_ts = x.detach().clone().requires_grad_()
    theirs = XPOS(head_dim, base)(x_ts, offset=offset, downscale=downscale)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    dy = randn(*ours.shape)
    ours.backward(dy)
    theirs.backward(dy)
    torch.testing.assert_close(x.grad, x_ts.grad, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("downscale", [False, True], ids=["q", "k"])
def test_bfloat16_within_bf16_rounding(case, downscale):
    """Ours in bf16 against torchscale evaluated in float64 (its tables then carry float32's
    rounding only), within bf16's tolerance or twice the error of torchscale's own bf16 module."""
    bh, length, head_dim, offset, base = case
    x64 = randn(bh, length, head_dim, mean=0.5, dtype=torch.float64)
    x = x64.to(torch.bfloat16).requires_grad_()
    module = XPOS(head_dim, base)
    ref64 = module.double()(x.detach().double().requires_grad_(), offset, downscale)
    x_ts = x.detach().clone().requires_grad_()
    theirs = XPOS(head_dim, base).bfloat16()(x_ts, offset=offset, downscale=downscale)
    ours = apply_xpos(x, offset, downscale=downscale, scale_base=base)
    assert ours.dtype == torch.bfloat16
    assert_close_to_reference(ours, ref64, theirs, "output")

    dy = randn(*ours.shape, dtype=torch.bfloat16)
    x_ref = x.detach().double().requires_grad_()
    XPOS(head_dim, base).double()(x_ref, offset, downscale).backward(dy.double())
    ours.backward(dy)
    theirs.backward(dy)
    assert_close_to_reference(x.grad, x_ref.grad, x_ts.grad, "dx")


def test_bfloat16_with_float32_tables_rounds_torchscales_float32_result():
    """torchscale with its float32 buffer promotes a bf16 input to float32; ours rounds that
    same float32 result to bf16."""
    x = randn(4, 6, 8, dtype=torch.bfloat16)
    theirs = XPOS(8)(x, offset=3)
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(apply_xpos(x, 3), theirs.to(torch.bfloat16), rtol=0, atol=0)


def test_heads_layout_equals_torchscales_flat_layout():
    """The attention's (batch, heads, length, head_dim) gives torchscale's (batch·heads, ...)."""
    q = randn(2, 3, 5, 8, mean=-0.3)
    k = randn(2, 3, 9, 8, mean=0.7)
    q_ours, k_ours = apply_xpos_qk(q, k, offset=8, scale_base=32)
    xpos = XPOS(8, 32)
    q_ts = xpos(q.flatten(0, 1), offset=8).view_as(q)
    k_ts = xpos(k.flatten(0, 1), offset=0, downscale=True).view_as(k)
    torch.testing.assert_close(q_ours, q_ts, rtol=0, atol=0)
    torch.testing.assert_close(k_ours, k_ts, rtol=0, atol=0)


def test_decoding_step_is_the_last_row_of_the_prefill():
    """A step's query at offset src_len − 1 equals the last query row of the whole sequence
    rotated at once, and the keys are those of the prefill: the scores torchscale's decoding
    computes are the last row of its prefill's."""
    q, k = randn(2, 2, 11, 16), randn(2, 2, 11, 16)
    q_all, k_all = apply_xpos_qk(q, k, scale_base=64)
    q_step, k_step = apply_xpos_qk(q[:, :, -1:], k, offset=10, scale_base=64)
    torch.testing.assert_close(q_step, q_all[:, :, -1:], rtol=0, atol=0)
    torch.testing.assert_close(k_step, k_all, rtol=0, atol=0)


def test_scores_depend_on_the_distance_only():
    """xPos's point: q_n·k_m is a function of n − m (float64 check through float32 tables:
    shifting both positions changes the score by rounding only)."""
    head_dim, base = 16, 32
    q, k = randn(1, head_dim), randn(1, head_dim)

    def score(n, m, total):
        qs = apply_xpos(q.expand(total, head_dim).contiguous(), 0, scale_base=base)[n]
        ks = apply_xpos(k.expand(total, head_dim).contiguous(), 0, downscale=True, scale_base=base)
        return (qs.double() @ ks[m].double()).item()

    assert score(7, 3, 12) == pytest.approx(score(9, 5, 20), rel=1e-5)


@pytest.mark.parametrize(
    "shape,offset,match",
    [((4, 7), 0, "head_dim must be even"), ((4, 8), -1, "offset"), ((8,), 0, "length, head_dim")],
)
def test_bad_arguments_are_refused(shape, offset, match):
    with pytest.raises(ValueError, match=match):
        apply_xpos(torch.ones(shape), offset)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_scale_is_torchscales_state_dict_buffer(head_dim):
    """torchscale's state dicts hold XPOS's ``scale`` buffer (``self_attn.xpos.scale``)."""
    buffer = XPOS(head_dim).state_dict()["scale"]
    assert torch.equal(xpos_scale(head_dim), buffer)
