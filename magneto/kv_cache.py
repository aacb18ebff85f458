"""The decoding caches of attention: self-attention keys and values with room to grow, and the
cross-attention keys and values of an encoder output, projected once per sequence.

``incremental_state`` has torchscale's format: per layer ``prev_key``/``prev_value``, (batch,
heads, length, head_dim). ``extend`` appends a step's keys and values to them. The tensors it
stores are views of a ``KVRoom``'s buffers, which later steps write into instead of copying the
cache; with gradients or while tracing it concatenates as torchscale does. On the CPU a dead
room's large buffers are kept for the next room (``_Spares``; ``empty_spares`` drops them).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from magneto import attention_core


class _Spares:
    """The CPU buffers of rooms no view refers to any more, kept (up to ``MAGNETO_KV_SPARE_MB``
    MiB, default 256, the oldest dropped first) for the next rooms to reuse. A large room
    buffer is a fresh allocation, which the C allocator maps from the OS and the kernel then
    zeroes page by page at the first write: a new room per step (a cache handed in by the
    caller, torchscale's beam search reordering it, the next batch of sequences) paid that on
    every step (docs/design.md, Decisions). Buffers under ``MIN_BYTES`` are not kept: the
    allocator's heap serves those again without the OS, and thousands of them would make each
    new room search a long list. CUDA's caching allocator already keeps its blocks. A spare is
    taken only while no tensor but the spare itself holds its storage (a view someone derived
    from a dead room's cache keeps its values)."""

    MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self.limit = int(os.environ.get("MAGNETO_KV_SPARE_MB", "256")) << 20
        self.buffers: list[Tensor] = []
        # Decoding threads share the list: one spare must never go to two rooms. Re-entrant: a
        # room's finalizer (add) may run inside take, when an allocation there triggers the GC.
        self.lock = threading.RLock()
        # storage use count of a tensor nothing else shares (None: torch cannot tell, no reuse)
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._use_count = use_count and (lambda t: use_count(t.untyped_storage()._cdata))
        self._alone = self._use_count and self._use_count(torch.empty(1))

    def add(self, buffer: Tensor) -> None:
        with self.lock:
            self.buffers.append(buffer)
            while sum(b.nbytes for b in self.buffers) > self.limit:
                self.buffers.pop(0)

    def take(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A flat buffer of at least ``prod(shape)`` elements of like's dtype and device: the
        smallest fitting spare, else a new one."""
        numel = math.prod(shape)
        if like.device.type == "cpu" and self._use_count:
            inference = torch.is_inference_mode_enabled()
            with self.lock:
                fits = [
                    b
                    for b in self.buffers
                    if b.dtype == like.dtype
                    and b.numel() >= numel
                    and (inference or not b.is_inference())
                    and self._use_count(b) == self._alone
                ]
                if fits:
                    spare = min(fits, key=Tensor.numel)
                    # by identity; a buffer a finalizer adds meanwhile may be dropped (not reused)
                    self.buffers = [b for b in self.buffers if b is not spare]
                    return spare
        return like.new_empty(numel)


_SPARES = _Spares()


def empty_spares() -> None:
    """Drop the spare cache buffers kept for reuse (``_Spares``), returning their memory."""
    with _SPARES.lock:
        _SPARES.buffers.clear()


class KVRoom:
    """Cached keys and values with room to grow, so that a decoding step writes only its new
    positions instead of copying the whole cache (torch.cat: O(length) per step, O(length²) per
    sequence; at 8 rows over 256 cached tokens the copy took half of a decoder layer's step).

    ``prev_key``/``prev_value`` are views of the first ``length`` positions of two buffers of
    ``capacity`` positions (``_ROOMS`` maps the views to their room, weakly; a deep copy or a
    saved state holds plain tensors). A step extends in place only if the cache it is given is the
    room's latest pair of views and the new positions fit; anything else (a caller's tensors,
    torchscale's reordered copies, an older view shared by a copied dict, another dtype, a full
    room) starts a new room, copying what it is given. A room that follows another (or starts
    a sequence) has half as much room again; one that copies a cache no room made (a caller's,
    torchscale's beam search reordering it at every step) has none: such a cache is often handed
    in anew at the next step, and a step fed one measured faster copying it into an exact
    room (docs/design.md, Decisions); if the next step extends it after all, that step starts
    a room with room to grow. Positions a view covers
    are never written again, so earlier views keep their values.
    """

    def __init__(
        self,
        prev_k: Optional[Tensor],
        prev_v: Optional[Tensor],
        k: Tensor,
        v: Tensor,
        grow: bool = True,
        copy: bool = True,
    ):
        need = k.shape[2] + (0 if prev_k is None else prev_k.shape[2])
        capacity = need + max(16, need // 2) if grow else need
        self.key, self.value = (
            _room_buffer(self, t, (*t.shape[:2], capacity, t.shape[3])) for t in (k, v)
        )
        self.length = 0
        if prev_k is not None and copy:
            self._append(prev_k, prev_v)  # no views: nobody holds the copied cache alone

    def _append(self, k: Tensor, v: Tensor) -> None:
        start, self.length = self.length, self.length + k.shape[2]
        self.key[:, :, start : self.length].copy_(k)
        self.value[:, :, start : self.length].copy_(v)

    def _write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._append(k, v)
        return self._views()

    def _views(self) -> tuple[Tensor, Tensor]:
        views = self.key[:, :, : self.length], self.value[:, :, : self.length]
        for view in views:
            _ROOMS[view] = self
        return views

    def _takes(self, prev_k: Tensor, prev_v: Tensor, k: Tensor, v: Tensor) -> bool:
        """Whether (prev_k, prev_v) are this room's latest views and k, v fit after them."""
        return (
            _ROOMS.get(prev_v) is self
            and prev_k.shape[2] == self.length == prev_v.shape[2]
            and self.length + k.shape[2] <= self.key.shape[2]
            and k.shape[:2] == self.key.shape[:2]
            and k.shape[3] == self.key.shape[3]
            and v.shape[:2] == self.value.shape[:2]
            and v.shape[3] == self.value.shape[3]
            and k.dtype == self.key.dtype
            and v.dtype == self.value.dtype
            and k.device == self.key.device
            # buffers made under inference_mode take in-place writes only inside it
            and (not self.key.is_inference() or torch.is_inference_mode_enabled())
        )

    @classmethod
    def extend(
        cls, prev_k: Optional[Tensor], prev_v: Optional[Tensor], k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The cache (prev_k, prev_v) followed by (k, v) along the positions, as views."""
        room = None if prev_k is None else _ROOMS.get(prev_k)
        if room is None or not room._takes(prev_k, prev_v, k, v):
            room = cls(prev_k, prev_v, k, v, grow=prev_k is None or room is not None)
        return room._write(k, v)


_ROOMS = WeakIdKeyDictionary()  # cache view -> its KVRoom, while the view lives


def _room_buffer(room: KVRoom, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A buffer of ``shape`` for ``room``: under ``_Spares.MIN_BYTES``, or off the CPU, a new one
    (the allocator's heap serves it again; no spare search, no finalizer: a decoding step pays
    these in Python); else a spare's first elements, or new, given back to the spares when the
    room dies."""
    numel = math.prod(shape)
    if numel * like.element_size() < _Spares.MIN_BYTES or like.device.type != "cpu":
        return like.new_empty(shape)
    flat = _SPARES.take(like, shape)
    weakref.finalize(room, _SPARES.add, flat).atexit = False
    return flat[:numel].view(shape)


# The most query rows ``attend_handed_in`` takes: a decoding step's few new tokens per sequence.
FUSED_MAX_ROWS = 16
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _fused_kernel() -> bool:
    """Whether the C++ CPU kernel of ``magneto::decode_attention`` is loaded."""
    import magneto_kernels  # noqa: F401  (loads the extension, if it was built)

    return torch._C._dispatch_has_kernel_for_dispatch_key("magneto::decode_attention", "CPU")


def attend_handed_in(
    incremental_state: Optional[dict], q: Tensor, k: Tensor, v: Tensor
) -> Optional[Tensor]:
    """``extend(incremental_state, k, v)`` followed by the unmasked attention of q over the
    extended cache, in one pass over the cache (``magneto::decode_attention``), when the cache is
    one no room made (a caller's, handed in anew at each step) and the call is a CPU inference
    step of at most ``FUSED_MAX_ROWS`` query rows in one floating dtype, with the attention path
    left to ``attention_core``'s measured choice (a pinned path pins the unfused one). Such a
    cache is copied into a new room anyway (``KVRoom``); the kernel attends while it copies, so
    that the attention does not read the copy again (docs/design.md, Decisions). None when the
    call does not qualify: nothing is done then."""
    if incremental_state is None or q.shape[2] > FUSED_MAX_ROWS or q.device.type != "cpu":
        return None
    prev_k, prev_v = incremental_state.get("prev_key"), incremental_state.get("prev_value")
    if prev_k is None or prev_v is None:
        return None
    tensors = (k, v, prev_k, prev_v)
    if (
        q.dtype not in _FUSED_DTYPES
        or any(t.dtype != q.dtype or t.device != q.device for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors)))
        or attention_core.pinned() is not None
        or torch.compiler.is_compiling()
        or _ROOMS.get(prev_k) is not None
        or not _fused_kernel()
    ):
        return None
    room = KVRoom(prev_k, prev_v, k, v, grow=False, copy=False)
    attn = torch.ops.magneto.decode_attention(q, prev_k, prev_v, k, v, room.key, room.value)
    room.length = room.key.shape[2]
    incremental_state["prev_key"], incremental_state["prev_value"] = room._views()
    return attn


def extend(incremental_state: Optional[dict], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values attention sees: ``incremental_state``'s cache followed by k and v,
    stored back into it (k and v themselves without a state)."""
    if incremental_state is None:
        return k, v
    prev_k, prev_v = incremental_state.get("prev_key"), incremental_state.get("prev_value")
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (k, v, prev_k, prev_v))
    ):
        # Traced or differentiated: torchscale's copy, no in-place writes.
        if prev_k is not None:
            k = torch.cat([prev_k.to(k.dtype), k], dim=2)
            v = torch.cat([prev_v.to(v.dtype), v], dim=2)
    else:
        k, v = KVRoom.extend(prev_k, prev_v, k, v)
    incremental_state["prev_key"], incremental_state["prev_value"] = k, v
    return k, v


def cached_encoder_kv(
    static_kv_cache: Optional[dict], key: Tensor, value: Tensor
) -> Optional[tuple[Tensor, Tensor]]:
    """Cross-attention's keys and values of ``key``/``value`` (heads layout) when
    ``static_kv_cache`` holds them for these very tensors (the encoder output of every
    decoding step), else None."""
    if (
        static_kv_cache is not None
        and static_kv_cache.get("key_source") is key
        and static_kv_cache.get("value_source") is value
    ):
        return static_kv_cache["key"], static_kv_cache["value"]
    return None


def keep_encoder_kv(
    static_kv_cache: Optional[dict], key: Tensor, value: Tensor, k: Tensor, v: Tensor
) -> None:
    """Store the projections k, v of ``key``/``value`` for the next steps (if there is a cache)."""
    if static_kv_cache is not None:
        static_kv_cache.update(key_source=key, value_source=value, key=k, value=v)
