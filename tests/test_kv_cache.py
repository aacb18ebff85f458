"""The decoding cache's spare buffers (``magneto.kv_cache._Spares``): a dead room's buffers are
reused by the next room, never while another tensor still holds their storage, within the
limit, and never across inference mode where an in-place write into them would fail. Decoding
through whole models with the cache: tests/test_modules.py."""

from __future__ import annotations

import pytest
import torch

from magneto import kv_cache

SHAPE = (2, 3, 5, 4)  # batch, heads, cached positions, head_dim


def _step(prev_k, prev_v, seed: int):
    """One decoding step fed a caller's cache: the state after it and the (k, v) appended."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*SHAPE[:2], 1, SHAPE[3], generator=g) + 1.0
    v = torch.randn(*SHAPE[:2], 1, SHAPE[3], generator=g) - 1.0
    state = {"prev_key": prev_k, "prev_value": prev_v}
    kv_cache.extend(state, k, v)
    return state, k, v


def _cache(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPE, generator=g) + 0.5, torch.randn(*SHAPE, generator=g) - 0.5


def _storages(state) -> set[int]:
    return {state[n].untyped_storage().data_ptr() for n in ("prev_key", "prev_value")}


@pytest.fixture(autouse=True)
def no_spares(monkeypatch):
    """No spares before or after each test; buffers as small as these tests' kept."""
    kv_cache.empty_spares()
    monkeypatch.setattr(kv_cache._Spares, "MIN_BYTES", 0)
    yield
    kv_cache.empty_spares()


def test_dead_room_buffers_are_reused():
    """A step fed a caller's cache copies it into a room; once that room's views are gone, the
    next such step writes into its buffers instead of new ones, with the right values."""
    with torch.no_grad():
        state, _, _ = _step(*_cache(0), seed=1)
        first = _storages(state)
        del state
        assert len(kv_cache._SPARES.buffers) == 2
        prev_k, prev_v = _cache(2)
        state, k, v = _step(prev_k, prev_v, seed=3)
        assert _storages(state) == first
        assert not kv_cache._SPARES.buffers
        assert torch.equal(state["prev_key"], torch.cat([prev_k, k], dim=2))
        assert torch.equal(state["prev_value"], torch.cat([prev_v, v], dim=2))


def test_spare_still_viewed_is_not_reused():
    """A view derived from a dead room's cache keeps its values: its buffer is not handed out."""
    with torch.no_grad():
        state, _, _ = _step(*_cache(0), seed=1)
        derived = state["prev_key"][:, :, 1:4]
        kept = derived.clone()
        del state
        state, k, v = _step(*_cache(2), seed=3)
        assert derived.untyped_storage().data_ptr() not in _storages(state)
        assert torch.equal(derived, kept)
        del derived  # now free: the next room takes it
        state2, _, _ = _step(*_cache(4), seed=5)
        assert len(_storages(state2) - _storages(state)) == 2


def test_spares_within_limit(monkeypatch):
    with torch.no_grad():
        state, _, _ = _step(*_cache(0), seed=1)
        del state
        one = kv_cache._SPARES.buffers[0].nbytes
        kv_cache.empty_spares()
        monkeypatch.setattr(kv_cache._SPARES, "limit", one * 3 // 2)  # room for one of two
        state, _, _ = _step(*_cache(0), seed=1)
        del state
    assert len(kv_cache._SPARES.buffers) == 1
    kv_cache.empty_spares()
    assert not kv_cache._SPARES.buffers


def test_inference_spares_stay_in_inference_mode():
    """Buffers made under torch.inference_mode take in-place writes only inside it: outside, a
    new room gets fresh buffers; inside, it reuses them."""
    with torch.inference_mode():
        state, _, _ = _step(*_cache(0), seed=1)
        inference = _storages(state)
        del state
    with torch.no_grad():
        prev_k, prev_v = _cache(2)
        state, k, v = _step(prev_k, prev_v, seed=3)
        assert not _storages(state) & inference
        assert torch.equal(state["prev_key"], torch.cat([prev_k, k], dim=2))
    with torch.inference_mode():
        state, _, _ = _step(*_cache(4), seed=5)
        assert _storages(state) == inference


def test_small_buffers_are_not_kept(monkeypatch):
    """Buffers under MIN_BYTES go back to the allocator: a long list of small spares would slow
    every new room down."""
    monkeypatch.undo()
    with torch.no_grad():
        state, _, _ = _step(*_cache(0), seed=1)
        assert state["prev_key"].untyped_storage().nbytes() < kv_cache._Spares.MIN_BYTES
        del state
    assert not kv_cache._SPARES.buffers


def test_caller_cache_copied_exactly_then_grown():
    """A caller's cache is copied into a room without spare positions; the step that extends
    that room starts one with room to grow, which the step after extends in place; the values
    are the concatenated cache at every step."""
    with torch.no_grad():
        prev_k, prev_v = _cache(0)
        state, k, v = _step(prev_k, prev_v, seed=1)
        want_k, want_v = torch.cat([prev_k, k], dim=2), torch.cat([prev_v, v], dim=2)
        assert state["prev_key"].untyped_storage().nbytes() == want_k.nbytes
        assert torch.equal(state["prev_key"], want_k)
        assert torch.equal(state["prev_value"], want_v)
        for seed in (2, 3):
            before = _storages(state)
            state, k, v = _step(state["prev_key"], state["prev_value"], seed=seed)
            want_k, want_v = torch.cat([want_k, k], dim=2), torch.cat([want_v, v], dim=2)
            assert torch.equal(state["prev_key"], want_k)
            assert torch.equal(state["prev_value"], want_v)
            assert state["prev_key"].untyped_storage().nbytes() > want_k.nbytes
            # the grown room is new at the first of these steps, extended in place at the second
            assert (_storages(state) == before) == (seed == 3)
