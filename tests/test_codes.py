"""The C++/CUDA tables (csrc/common.h, exposed as ``magneto_kernels._C.codes()``) agree with the
Python ones (``magneto_kernels.codes``): one definition per language, checked against each other.
"""

import pytest

from magneto_kernels import codes

_C = pytest.importorskip("magneto_kernels._C", reason="the C++ extension is not built")


def test_norm_codes_match():
    assert _C.codes()["norms"] == codes.NORMS


def test_activation_codes_match():
    assert _C.codes()["activations"] == codes.ACTIVATIONS
    assert _C.codes()["gated_activations"] == codes.GATED_ACTIVATIONS


def test_philox_constants_match():
    assert _C.codes()["philox"] == {
        "key_a": codes.PHILOX_KEY_A,
        "key_b": codes.PHILOX_KEY_B,
        "round_a": codes.PHILOX_ROUND_A,
        "round_b": codes.PHILOX_ROUND_B,
        "rounds": codes.PHILOX_ROUNDS,
    }


def test_op_families_match():
    """The families whose Autograd kernels csrc/autograd.cpp registers are backends.py's."""
    from magneto_kernels.backends import FAMILY

    assert set(_C.codes()["families"]) == set(FAMILY.values())


def test_quant_codes_match():
    assert _C.codes()["quants"] == codes.QUANTS
    assert _C.codes()["quant_pack_unit"] == codes.QUANT_PACK_UNIT
