"""Philox4x32-10 in Triton, bit-identical to ``magneto_kernels.reference.philox`` and csrc/common.h.

``tl.randint`` only matches the reference for element indices below 2^32 (it takes a 32-bit
offset); this version takes the full 64-bit index as counter (lo word, hi word, 0, 0), so every
backend draws the same dropout mask for tensors of any size.
"""

import triton
import triton.language as tl

from magneto_kernels import codes

PHILOX_KEY_A: tl.constexpr = tl.constexpr(codes.PHILOX_KEY_A)
PHILOX_KEY_B: tl.constexpr = tl.constexpr(codes.PHILOX_KEY_B)
PHILOX_ROUND_A: tl.constexpr = tl.constexpr(codes.PHILOX_ROUND_A)
PHILOX_ROUND_B: tl.constexpr = tl.constexpr(codes.PHILOX_ROUND_B)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(codes.PHILOX_ROUNDS)


@triton.jit
def philox_word(seed, index):
    """First 32-bit output word (uint32) of Philox4x32-10(key=seed, counter=(index lo, hi, 0, 0)).

    ``seed``: int64 scalar; ``index``: int64 tensor of non-negative element indices.
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(PHILOX_ROUNDS):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(prev_c2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(prev_c0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = tl.mul(prev_c2, PHILOX_ROUND_B, sanitize_overflow=False)
        c3 = tl.mul(prev_c0, PHILOX_ROUND_A, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_KEY_B, sanitize_overflow=False)
    return c0


@triton.jit
def dropout_keep(seed_ptr, index, threshold):
    """Keep-mask ``philox(seed, index) >= threshold`` (``codes.dropout_threshold(p)``)."""
    seed = tl.load(seed_ptr)
    return philox_word(seed, index).to(tl.int64) >= threshold


@triton.jit
def _philox_test_kernel(seed_ptr, index_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = tl.load(index_ptr + offs, mask=mask, other=0)
    seed = tl.load(seed_ptr)
    tl.store(out_ptr + offs, philox_word(seed, index).to(tl.int64), mask=mask)


def philox(seed, index):
    """Host entry (for tests): Philox words of int64 ``index`` as int64, like reference.philox."""
    import torch

    index = index.contiguous()
    out = torch.empty_like(index)
    n = index.numel()
    block = 1024
    _philox_test_kernel[(triton.cdiv(n, block),)](seed, index, out, n, BLOCK=block)
    return out
