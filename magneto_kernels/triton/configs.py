"""Launch configurations of the Triton kernels: the GEMM tile tables per dot kind and row count,
and the one launcher every kernel goes through (docs/design.md, Fitting the GPU).

A GEMM's tile is chosen from ``GEMM_TILES`` by the dtype's *dot kind* (what ``tl.dot`` compiles
to) and by the row count's bucket, never by the exact row count:

- ``mma16``: bf16/fp16 operands, tensor cores (``wgmma`` on sm_90a, ``mma.sync`` on sm_80);
- ``tf32``: float32 under ``torch.set_float32_matmul_precision("high")``: tensor cores;
- ``ieee``: float32 under "highest" (PyTorch's default): exact products on the FMA units, so
  small tiles (the accumulator and both operands live in registers) and few stages;
- ``int8``: int8 codes (the quantised ``ln_linear``'s offline modes, ``triton/quant.py``):
  int8 × int8 → int32 tensor cores, which take BLOCK_K >= 32; both operands are formed in
  registers (the quantised h and the unpacked 2-bit weight), so deep K tiles.

Every tile listed here is compiled for sm_80 and sm_90a by tests/test_triton_compile.py, for
every flag combination it covers, and must spill nothing and stay under both architectures'
shared memory per block; ``Tile.smem`` is an upper bound of what the compiler allocates, which
the test checks too, so that on any other device the launcher can drop the tiles that do not
fit before compiling them.
"""

import dataclasses
import functools

import torch
import triton
import triton.testing

from magneto_kernels.triton.common import AUTOTUNE, INTERPRET, fp32_dot_precision


@dataclasses.dataclass(frozen=True)
class Tile:
    """One launch configuration: constexpr tile sizes (``meta``), warps, pipeline stages and,
    for a GEMM, what bounds its shared memory: the operands' ``itemsize`` and how many tiles of
    each operand a stage loads (two along the gated side: gate and up)."""

    meta: tuple  # ((name, value), ...): BLOCK_M, BLOCK_N, BLOCK_K; none for a row kernel
    num_warps: int
    num_stages: int = 3  # Triton's default
    itemsize: int = 0  # operand bytes; 0: no pipelined operands (the row kernels)
    a_tiles: int = 1  # BLOCK_M x BLOCK_K tiles per stage
    b_tiles: int = 1  # BLOCK_K x BLOCK_N tiles per stage

    @property
    def smem(self) -> int:
        """Upper bound of the shared memory (bytes): ``num_stages`` buffers of every operand
        tile plus 2 KiB of barriers and scratch (the compiler reuses the operand buffers for the
        epilogue's layout conversions). The AOT test checks it against the compiler."""
        if not self.itemsize:
            return 2048
        m = dict(self.meta)
        rows = self.a_tiles * m["BLOCK_M"] + self.b_tiles * m["BLOCK_N"]
        return self.num_stages * rows * m["BLOCK_K"] * self.itemsize + 2048

    def __str__(self):
        sizes = "x".join(str(v) for _, v in self.meta)
        return f"{sizes} w{self.num_warps} s{self.num_stages}" if sizes else f"w{self.num_warps}"


def gemm_tile(block_m, block_n, block_k, num_warps, num_stages, itemsize, a_tiles=1, b_tiles=1):
    meta = (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k))
    return Tile(meta, num_warps, num_stages, itemsize, a_tiles, b_tiles)


ROW_BUCKETS = (16, 64)
"""Row counts up to 16 (decoding) and up to 64 get their own tiles; more rows the large ones."""

GEMM_TILES = {
    # (dot kind, row bucket): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), best first (the tile
    # used with autotuning off). The few-row tiles are narrow in N so that a decode-size GEMM
    # still spreads the weight over many programs, and deep in K to keep loads in flight.
    ("mma16", 16): [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4)],
    ("mma16", 64): [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
    ("mma16", None): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4)],
    ("tf32", 16): [(16, 64, 64, 4, 4), (16, 32, 128, 4, 3)],
    ("tf32", 64): [(64, 64, 32, 4, 4), (64, 128, 32, 8, 3)],
    ("tf32", None): [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("ieee", 16): [(16, 64, 32, 4, 3), (16, 32, 64, 4, 3)],
    ("ieee", 64): [(64, 64, 16, 8, 2)],
    ("ieee", None): [(128, 64, 16, 8, 2), (64, 64, 16, 8, 2)],
    ("int8", 16): [(16, 64, 128, 4, 3), (16, 32, 128, 4, 3)],
    ("int8", 64): [(64, 64, 128, 4, 3), (64, 128, 64, 8, 3)],
    ("int8", None): [(128, 128, 64, 8, 3), (128, 64, 128, 8, 3)],
}

UNALIGNED_BLOCK_K = 32
"""BLOCK_K at most this when a width or stride is not a multiple of 16 elements (or a pointer
not 16-byte aligned): Triton then loads each element on its own, and a deeper A tile spills."""


def dot_kind(dtype: torch.dtype) -> str:
    """What a GEMM on ``dtype`` operands runs on (see the module docstring). float32 follows
    ``torch.get_float32_matmul_precision()``: "highest" is exact, "high"/"medium" allow tf32."""
    if dtype == torch.int8:
        return "int8"
    if dtype != torch.float32:
        return "mma16"
    return "ieee" if fp32_dot_precision() == "ieee" else "tf32"


def row_bucket(rows: int):
    """The row-count bucket a GEMM's tiles (and its autotuning) are chosen by."""
    return next((b for b in ROW_BUCKETS if rows <= b), None)


def gemm_tiles(dtype: torch.dtype, rows: int, aligned=True, a_tiles=1, b_tiles=1) -> list[Tile]:
    """The candidate tiles, best first, of a GEMM over ``rows`` rows of ``dtype`` operands;
    ``aligned``: whether its widths and strides are multiples of 16 and its pointers 16-byte
    aligned (see UNALIGNED_BLOCK_K); ``a_tiles``, ``b_tiles``: Tile's."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    tiles = []
    for m, n, k, warps, stages in GEMM_TILES[dot_kind(dtype), row_bucket(rows)]:
        k = k if aligned else min(k, UNALIGNED_BLOCK_K)
        tiles.append(gemm_tile(m, n, k, warps, stages, itemsize, a_tiles, b_tiles))
    return tiles


@functools.lru_cache(maxsize=None)
def _max_shared_memory(device_index: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


_CHOSEN = {}
"""Launch key -> the Tile chosen for it (autotuned once per key, or the first that fits)."""


def _run(kernel, grid, tile: Tile, args: dict) -> None:
    meta = dict(tile.meta)
    kernel[grid(meta)](**args, **meta, num_warps=tile.num_warps, num_stages=tile.num_stages)


def _fastest(kernel, grid, tiles: list[Tile], args: dict) -> Tile:
    """The tile with the lowest median time; a tile whose launch fails is skipped. (Every kernel
    launched through here writes its outputs without reading them, so the reruns are harmless.)"""
    from triton.runtime.errors import OutOfResources

    best, best_ms = None, float("inf")
    for tile in tiles:
        try:
            ms = triton.testing.do_bench(lambda t=tile: _run(kernel, grid, t, args), rep=20)
        except OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = tile, ms
    if best is None:
        raise RuntimeError(f"{kernel.__name__}: no configuration can launch on this device")
    return best


def launch(kernel, grid, tiles: list[Tile], key: tuple, **args) -> None:
    """Run ``kernel[grid(meta)](**args)`` with one of ``tiles`` (best first): the only one, or
    the first in the interpreter; on a GPU, among the tiles whose shared memory fits the device,
    the first when autotuning is off (MAGNETO_TRITON_AUTOTUNE=0) and else the fastest, measured
    once per ``key`` (the caller's sizes, flags and dtypes with rows bucketed: the tiles must be
    a function of it)."""
    if INTERPRET or len(tiles) == 1:
        _run(kernel, grid, tiles[0], args)
        return
    key = (kernel, *key)
    tile = _CHOSEN.get(key)
    if tile is None:
        device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
        limit = _max_shared_memory(device.index)
        fitting = [t for t in tiles if t.smem <= limit]
        if not fitting:
            raise RuntimeError(f"{kernel.__name__}: no tile fits {limit} B of shared memory")
        tile = (
            fitting[0]
            if not AUTOTUNE or len(fitting) == 1
            else _fastest(kernel, grid, fitting, args)
        )
        _CHOSEN[key] = tile
    _run(kernel, grid, tile, args)
