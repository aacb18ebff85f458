// BitNet b1.58's offline quantised projection (kernels.h: quantize_rows, quant_linear), compiled
// once per instruction set like every CPU kernel. The activation row is quantised once (int8 codes
// q, their sum and the scale s) and reused against every output feature; a weight row is 2 bits
// per weight, the codes c = t + 1 of common.h's packed layout, so that a 32-byte load shifted by
// 0, 2, 4, 6 and masked gives the codes of 4 consecutive 32-wide runs of k, each against one
// contiguous 32-byte load of q: Σ q·t = Σ q·c − Σ q, with c unsigned (u8) and q signed (s8), the
// operands of AVX2's maddubs and AVX-512 VNNI's vpdpbusd.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/rows.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#include "cpu/quant_amx.h"
#include "cpu/vec16.h"
#endif

namespace magneto::cpu::MAGNETO_ISA {
namespace {

constexpr float kActEps = 1e-5f;   // transformers' clamp of the per-token absmax (ActQuant)
constexpr int64_t kQuantRows = 4;  // rows dotted against one weight row at a time
constexpr int64_t kQuantColBlock = 16;   // output features per thread task
// The few-row kernel on 512-bit VNNI: features whose packed rows stream side by side, one
// accumulator per (row, feature), so that each q vector loaded serves them all and the
// dependent vpdpbusd chains interleave.
constexpr int kDecodeCols = 4;
// The tiled kernel (from kTiledMinRows rows on): tasks of kQuantColBlock output features, whose
// codes the task unpacks to bytes first (codes_workspace, in L1/L2), × a block of rows whose q
// (about kTiledRowBytes) stays in L2; inside, micro-kernels of kQuantTileRows rows ×
// kQuantTileCols features, one register accumulator each, every code and q vector loaded once
// per tile. AMX-INT8, where the CPU has it, runs such tasks on tiles (quant_amx.h). Unpacking
// per task costs a pass over the weight per row block; unpacking the whole weight once per call
// instead wrote and read back a buffer as large as the weight's codes (17 MB for gate_proj):
// 3x slower at 16-128 rows, no faster at 512-2048 (docs/design.md).
constexpr int64_t kTiledMinRows = 16;
constexpr int64_t kTiledRowBytes = 512 << 10;
constexpr int kQuantTileCols = 4;
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kQuantTileRows = 2;  // 16 ymm registers: 8 accumulators, 4 codes, q, temporaries
#else
constexpr int kQuantTileRows = 4;
#endif

// h's codes row by row (kernels.h, quantize_rows), vectorised with the scalar form's float
// operations (Vec::round rounds half to even, as nearbyint and torch.round do). A NaN in a row
// makes its amax and scale NaN, so the row's outputs are NaN, as transformers' are; a code that
// is NaN (an infinite h, whose scale is 0) is stored as 0.
template <typename T>
void quantize_rows_typed(const QuantizeRows& a) {
  const int64_t n = a.cols;
  for_rows(a.rows, n, 0, [&](int64_t rb, int64_t re, int64_t) {
    const auto buffer = row_scratch(n);
#if !defined(__AVX512F__)
    const auto codes = row_scratch(n);  // the codes as floats, then stored as int8 below
#endif
    for (int64_t i = rb; i < re; ++i) {
      const float* h = load_row(static_cast<const T*>(a.h) + i * n, buffer.get(), n);
      Vec amax(0.0f);
      vec_loop(n, [&](int64_t j, int64_t count) {
        amax = at::vec::maximum(amax, Vec::loadu(h + j, count).abs());
      });
      const float s = 127.0f / std::max(hmax(amax), kActEps);
      const Vec scale(s), lowest(-128.0f), highest(127.0f);
      auto code = [&](int64_t j, int64_t count) {
        return at::vec::clamp((Vec::loadu(h + j, count) * scale).round(), lowest, highest);
      };
      int8_t* q = a.q + i * n;
      int32_t sum = 0;
#if defined(__AVX512F__)
      __m512i sums = _mm512_setzero_si512();
      vec_loop(n, [&](int64_t j, int64_t count) {
        const __m512 c = code(j, count);
        const __m512i v = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask(c, c, _CMP_ORD_Q), c);
        _mm_mask_storeu_epi8(q + j, static_cast<__mmask16>((1u << count) - 1),
                             _mm512_cvtepi32_epi8(v));
        sums = _mm512_add_epi32(sums, v);
      });
      sum = _mm512_reduce_add_epi32(sums);
#else
      vec_loop(n, [&](int64_t j, int64_t count) { code(j, count).store(codes.get() + j, count); });
      for (int64_t k = 0; k < n; ++k) {
        const float c = codes[k];
        q[k] = c == c ? static_cast<int8_t>(c) : 0;
        sum += q[k];
      }
#endif
      a.q_sum[i] = sum;
      a.scale[i] = s;
    }
  });
}

// acc[r] = Σ_k q_r[k]·c[k] for `rows` (<= kQuantRows) rows of q, row stride q_stride, against one
// packed weight row of `blocks` 128-wide blocks: the portable loop.
inline void dot_codes_portable(const uint8_t* w, const int8_t* q, int64_t q_stride,
                               int64_t blocks, int64_t rows, int32_t* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* qr = q + r * q_stride;
    int32_t sum = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* wb = w + 32 * blk;
      const int8_t* qb = qr + kQuantPackUnit * blk;
      for (int i = 0; i < 4; ++i) {
        for (int b = 0; b < 32; ++b) sum += ((wb[b] >> (2 * i)) & 3) * qb[32 * i + b];
      }
    }
    acc[r] = sum;
  }
}

#if defined(__AVX2__)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Shift I of a packed 32-byte load: the codes of its I-th 32-wide run of k.
template <int I>
inline __m256i code_plane(__m256i packed) {
  const __m256i mask = _mm256_set1_epi8(3);
  return _mm256_and_si256(I == 0 ? packed : _mm256_srli_epi16(packed, 2 * I), mask);
}

// The codes of one 32-byte load of a packed block, 32 consecutive k per shift.
struct BlockCodes {
  __m256i c[4];
  explicit BlockCodes(const uint8_t* w) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    c[0] = code_plane<0>(packed);
    c[1] = code_plane<1>(packed);
    c[2] = code_plane<2>(packed);
    c[3] = code_plane<3>(packed);
  }
};

inline __m256i load_q(const int8_t* q) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
}

// AVX2: maddubs multiplies u8 codes by s8 q and sums each pair to an int16 lane: c <= 2 and
// -128 <= q <= 127 put a pair in [-512, 508], so kInt16Pairs of them add up without leaving
// int16 ([-32768, 32512]); the int16 lanes are widened and summed into the int32 result once
// per that many pairs instead of once per block (a 128-wide block adds 4 pairs to each lane).
// The int32 sums are scalars: kept as vectors, they took the registers of the int16 ones, which
// GCC then kept in memory across the inner loop.
constexpr int64_t kInt16Pairs = 64;
constexpr int64_t kInt16Blocks = kInt16Pairs / 4;

template <int R>
inline void dot_codes_maddubs(const uint8_t* w, const int8_t* q, int64_t q_stride,
                              int64_t blocks, int32_t* acc, const uint8_t* ahead) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r] = 0;
  for (int64_t first = 0; first < blocks; first += kInt16Blocks) {
    const int64_t last = std::min(blocks, first + kInt16Blocks);
    __m256i s16[R];
    for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
    for (int64_t blk = first; blk < last; ++blk) {
      if (ahead != nullptr && (blk & 1) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 32 * blk), _MM_HINT_T0);
      }
      const BlockCodes codes(w + 32 * blk);
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = q + r * q_stride + kQuantPackUnit * blk;
        for (int i = 0; i < 4; ++i) {
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(codes.c[i], load_q(qb + 32 * i)));
        }
      }
    }
    for (int r = 0; r < R; ++r) acc[r] += hsum_epi32(_mm256_madd_epi16(s16[r], ones));
  }
}

// acc[f] = Σ_k q[k]·c_f[k] for one row of q and F packed weight rows (stride w_stride), side by
// side, as dot_pairs_vnni does on AVX-512: each q vector is loaded once for the F features, their
// F chains interleave, and the per-feature tail (a horizontal sum, the epilogue's) overlaps F
// rows' work; one feature at a time, the per-feature cost was about twice a 2560-wide row's
// blocks' (docs/design.md, Decisions). `ahead` (or null): F·w_stride contiguous bytes to
// prefetch (the next group's rows, w_stride = blocks·32), 32·F of them a block.
template <int F>
inline void dot_cols_maddubs(const uint8_t* w, int64_t w_stride, const int8_t* q,
                             int64_t blocks, int32_t* acc, const uint8_t* ahead) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int f = 0; f < F; ++f) acc[f] = 0;
  for (int64_t first = 0; first < blocks; first += kInt16Blocks) {
    const int64_t last = std::min(blocks, first + kInt16Blocks);
    __m256i s16[F];
    for (int f = 0; f < F; ++f) s16[f] = _mm256_setzero_si256();
    for (int64_t blk = first; blk < last; ++blk) {
      __m256i packed[F];
      if (ahead != nullptr) {
        for (int off = 0; off < 32 * F; off += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(ahead + 32 * F * blk + off), _MM_HINT_T0);
        }
      }
      for (int f = 0; f < F; ++f) {
        const uint8_t* wb = w + f * w_stride + 32 * blk;
        packed[f] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
      }
      const int8_t* qb = q + kQuantPackUnit * blk;
      const __m256i q0 = load_q(qb);
      for (int f = 0; f < F; ++f) {
        s16[f] = _mm256_add_epi16(s16[f], _mm256_maddubs_epi16(code_plane<0>(packed[f]), q0));
      }
      const __m256i q1 = load_q(qb + 32);
      for (int f = 0; f < F; ++f) {
        s16[f] = _mm256_add_epi16(s16[f], _mm256_maddubs_epi16(code_plane<1>(packed[f]), q1));
      }
      const __m256i q2 = load_q(qb + 64);
      for (int f = 0; f < F; ++f) {
        s16[f] = _mm256_add_epi16(s16[f], _mm256_maddubs_epi16(code_plane<2>(packed[f]), q2));
      }
      const __m256i q3 = load_q(qb + 96);
      for (int f = 0; f < F; ++f) {
        s16[f] = _mm256_add_epi16(s16[f], _mm256_maddubs_epi16(code_plane<3>(packed[f]), q3));
      }
    }
    for (int f = 0; f < F; ++f) acc[f] += hsum_epi32(_mm256_madd_epi16(s16[f], ones));
  }
}
#endif

#if defined(__AVX512F__)
// AVX-512 VNNI: the few-row and tiled kernels' vpdpbusd, on CPUs that have it (checked at
// run time; their functions have their own target).
inline bool cpu_has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has;
}
#endif

// The codes c (0..2, a byte each) of `cols` packed weight rows, k-contiguous: codes[j·k + kk].
inline void unpack_codes(const uint8_t* w, int64_t w_stride, int64_t cols, int64_t k,
                         uint8_t* codes) {
  for (int64_t j = 0; j < cols; ++j) {
    const uint8_t* wj = w + j * w_stride;
    uint8_t* cj = codes + j * k;
    for (int64_t blk = 0; blk < k / kQuantPackUnit; ++blk) {
#if defined(__AVX2__)
      const BlockCodes block(wj + 32 * blk);
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cj + kQuantPackUnit * blk + 32 * i),
                            block.c[i]);
      }
#else
      for (int i = 0; i < 4; ++i) {
        for (int b = 0; b < 32; ++b) {
          cj[kQuantPackUnit * blk + 32 * i + b] = (wj[32 * blk + b] >> (2 * i)) & 3;
        }
      }
#endif
    }
  }
}

// A buffer of the calling thread's for one task's unpacked codes, kept between calls so that its
// pages are not faulted in again on every call.
inline uint8_t* codes_workspace(int64_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < static_cast<size_t>(bytes)) buffer = std::vector<uint8_t>(bytes);
  return buffer.data();
}

// acc[r·N + j] = Σ_kk q_r[kk]·c_j[kk] for M rows of q (row stride k) and N rows of unpacked
// codes (row stride k): the portable loop.
template <int M, int N>
void tile_portable(const uint8_t* codes, const int8_t* q, int64_t k, int32_t* acc) {
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < N; ++j) {
      int32_t sum = 0;
      for (int64_t kk = 0; kk < k; ++kk) sum += codes[j * k + kk] * q[r * k + kk];
      acc[r * N + j] = sum;
    }
  }
}

#if defined(__AVX2__)
template <int M, int N>
void tile_maddubs(const uint8_t* codes, const int8_t* q, int64_t k, int32_t* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < M * N; ++i) acc[i] = 0;
  for (int64_t first = 0; first < k; first += 32 * kInt16Pairs) {
    const int64_t last = std::min(k, first + 32 * kInt16Pairs);
    __m256i s16[M][N];
    for (int r = 0; r < M; ++r) {
      for (int j = 0; j < N; ++j) s16[r][j] = _mm256_setzero_si256();
    }
    for (int64_t kk = first; kk < last; kk += 32) {
      __m256i c[N];
      for (int j = 0; j < N; ++j) {
        c[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * k + kk));
      }
      for (int r = 0; r < M; ++r) {
        const __m256i qv = load_q(q + r * k + kk);
        for (int j = 0; j < N; ++j) {
          s16[r][j] = _mm256_add_epi16(s16[r][j], _mm256_maddubs_epi16(c[j], qv));
        }
      }
    }
    for (int r = 0; r < M; ++r) {
      for (int j = 0; j < N; ++j) acc[r * N + j] += hsum_epi32(_mm256_madd_epi16(s16[r][j], ones));
    }
  }
}
#endif

#if defined(__AVX512F__)
// The sums of 4 vectors at once (the lanes of 4 registers folded together, then across).
__attribute__((target("avx512f"))) inline __m128i hsum4_epi32(__m512i a, __m512i b, __m512i c,
                                                              __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd =
      _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i s =
      _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// 512-bit vpdpbusd: 64 k per instruction, M·N accumulators.
template <int M, int N>
__attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f,avx2"), noinline)) void tile_vnni(
    const uint8_t* codes, const int8_t* q, int64_t k, int32_t* acc) {
  __m512i sum[M][N];
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < N; ++j) sum[r][j] = _mm512_setzero_si512();
  }
  for (int64_t kk = 0; kk < k; kk += 64) {
    __m512i c[N];
    for (int j = 0; j < N; ++j) c[j] = _mm512_loadu_si512(codes + j * k + kk);
    for (int r = 0; r < M; ++r) {
      const __m512i qv = _mm512_loadu_si512(q + r * k + kk);
      for (int j = 0; j < N; ++j) sum[r][j] = _mm512_dpbusd_epi32(sum[r][j], c[j], qv);
    }
  }
  for (int r = 0; r < M; ++r) {
    if constexpr (N == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + r * N),
                       hsum4_epi32(sum[r][0], sum[r][1], sum[r][2], sum[r][3]));
    } else {
      for (int j = 0; j < N; ++j) acc[r * N + j] = _mm512_reduce_add_epi32(sum[r][j]);
    }
  }
}
#endif

// One micro-tile of m <= kQuantTileRows rows × n <= kQuantTileCols features with this build's
// widest instructions (acc row stride n).
template <int M = kQuantTileRows>
void dot_tile(const uint8_t* codes, const int8_t* q, int64_t k, int64_t m, int64_t n,
              int32_t* acc) {
  if constexpr (M > 1) {
    if (m < M) return dot_tile<M - 1>(codes, q, k, m, n, acc);
  }
  auto run = [&]<int N>() {
#if defined(__AVX512F__)
    if (cpu_has_vnni()) return tile_vnni<M, N>(codes, q, k, acc);
#endif
#if defined(__AVX2__)
    tile_maddubs<M, N>(codes, q, k, acc);
#else
    tile_portable<M, N>(codes, q, k, acc);
#endif
  };
  static_assert(kQuantTileCols == 4);
  switch (n) {
    case 4: return run.template operator()<4>();
    case 3: return run.template operator()<3>();
    case 2: return run.template operator()<2>();
    default: return run.template operator()<1>();
  }
}

#if defined(__AVX512F__)
// The tiled projection on AMX: tasks of a block of rows (their q, about kAmxRowBytes, in L2) ×
// kAmxBlock features, whose codes each task packs first (amx_pack_codes, into this thread's
// codes_workspace, in L2), 32 × 32 results per amx_block; the rows past the last multiple of 32
// run from a zero-padded copy. store_row(acc, row, col, count) finishes and writes `count`
// consecutive outputs of one row.
template <typename StoreRow>
void quant_linear_amx(const QuantLinear& a, const StoreRow& store_row) {
  const int64_t k = a.in_features, n = a.out_features, w_stride = k / 4;
  const int64_t full_rows = a.rows / kAmxBlock * kAmxBlock;
  std::vector<int8_t> tail(kAmxBlock * k, 0);
  std::copy(a.q + full_rows * k, a.q + a.rows * k, tail.begin());
  const int64_t padded_rows = (a.rows + kAmxBlock - 1) / kAmxBlock * kAmxBlock;
  const int64_t row_block = std::max<int64_t>(1, kAmxRowBytes / k / kAmxBlock) * kAmxBlock;
  const int64_t row_blocks = (padded_rows + row_block - 1) / row_block;
  const int64_t col_blocks = (n + kAmxBlock - 1) / kAmxBlock;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t tb, int64_t te) {
    alignas(64) int32_t acc[kAmxBlock * kAmxBlock];
    uint8_t* const codes = codes_workspace(kAmxBlock * k);
    amx_configure();
    for (int64_t task = tb; task < te; ++task) {
      const int64_t r0 = task / col_blocks * row_block, c0 = task % col_blocks * kAmxBlock;
      const int64_t r_end = std::min(padded_rows, r0 + row_block);
      const int64_t features = std::min(kAmxBlock, n - c0);
      for (int64_t g = 0; g < kAmxBlock / kAmxTile; ++g) {
        amx_pack_codes(a.weight + (c0 + g * kAmxTile) * w_stride, w_stride,
                       features - g * kAmxTile, k, codes + g * kAmxTile * k);
      }
      for (int64_t r = r0; r < r_end; r += kAmxBlock) {
        amx_block(r < full_rows ? a.q + r * k : tail.data(), k, codes, k, acc);
        for (int64_t i = 0; i < std::min(kAmxBlock, a.rows - r); ++i) {
          store_row(acc + i * kAmxBlock, r + i, c0, features);
        }
      }
    }
    amx_release();
  });
}
#endif

#if defined(__AVX512F__)
// The few-row kernel's q: a 64-byte load of packed weights holds two 128-wide blocks (2p and
// 2p + 1), so shift i gives the codes of k = 128·2p + 32i + [0, 32) in its low half and of
// 128·(2p + 1) + 32i + [0, 32) in its high half. q is reordered once per call to match (its 64
// bytes for shift i of pair p at 256p + 64i); an odd last block keeps its place.
inline void pair_blocks(const int8_t* q, int64_t k, int8_t* paired) {
  const int64_t pairs = k / kQuantPackUnit / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    for (int i = 0; i < 4; ++i) {
      for (int half = 0; half < 2; ++half) {
        std::copy_n(q + kQuantPackUnit * (2 * p + half) + 32 * i, 32,
                    paired + 2 * kQuantPackUnit * p + 64 * i + 32 * half);
      }
    }
  }
  std::copy(q + 2 * kQuantPackUnit * pairs, q + k, paired + 2 * kQuantPackUnit * pairs);
}

// acc[r·F + f] = Σ_k q_r[k]·c_f[k] for R rows of paired q (row stride k) and F packed weight
// rows (stride w_stride): one 64-byte load and three shifts give 256 codes of a weight row,
// each q vector is loaded once for the F features. An odd last block runs on the low halves
// (masked loads: the high half's codes are zero).
template <int R, int F>
__attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f,avx2"), noinline)) void
dot_pairs_vnni(const uint8_t* w, int64_t w_stride, const int8_t* q, int64_t k, int32_t* acc) {
  const int64_t blocks = k / kQuantPackUnit;
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i sum[R][F];
  for (int r = 0; r < R; ++r) {
    for (int f = 0; f < F; ++f) sum[r][f] = _mm512_setzero_si512();
  }
  for (int64_t blk = 0; blk < blocks; blk += 2) {
    const bool pair = blk + 2 <= blocks;
    const __mmask64 lanes = pair ? ~0ULL : 0xFFFFFFFFULL;
    const int64_t q_step = pair ? 64 : 32;
    __m512i qv[R][4];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < 4; ++i) {
        qv[r][i] = _mm512_maskz_loadu_epi8(lanes, q + r * k + kQuantPackUnit * blk + q_step * i);
      }
    }
    for (int f = 0; f < F; ++f) {
      // the same line of the weight rows two feature groups on: the hardware prefetcher alone
      // keeps too few lines in flight for F streams from memory (docs/design.md, Decisions)
      _mm_prefetch(reinterpret_cast<const char*>(w + (2 * kDecodeCols + f) * w_stride + 32 * blk),
                   _MM_HINT_T0);
      const __m512i packed = _mm512_maskz_loadu_epi8(lanes, w + f * w_stride + 32 * blk);
      __m512i c[4];
      c[0] = _mm512_and_si512(packed, mask);
      c[1] = _mm512_and_si512(_mm512_srli_epi16(packed, 2), mask);
      c[2] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
      c[3] = _mm512_and_si512(_mm512_srli_epi16(packed, 6), mask);
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < 4; ++i) sum[r][f] = _mm512_dpbusd_epi32(sum[r][f], c[i], qv[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (F == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + r * F),
                       hsum4_epi32(sum[r][0], sum[r][1], sum[r][2], sum[r][3]));
    } else {
      for (int f = 0; f < F; ++f) acc[r * F + f] = _mm512_reduce_add_epi32(sum[r][f]);
    }
  }
}
// dot_pairs_vnni for m <= kQuantRows rows and n <= kDecodeCols features (acc row stride n).
template <int R = kQuantRows>
void dot_pairs(const uint8_t* w, int64_t w_stride, const int8_t* q, int64_t k, int64_t m,
               int64_t n, int32_t* acc) {
  if constexpr (R > 1) {
    if (m < R) return dot_pairs<R - 1>(w, w_stride, q, k, m, n, acc);
  }
  static_assert(kDecodeCols == 4);
  switch (n) {
    case 4: return dot_pairs_vnni<R, 4>(w, w_stride, q, k, acc);
    case 3: return dot_pairs_vnni<R, 3>(w, w_stride, q, k, acc);
    case 2: return dot_pairs_vnni<R, 2>(w, w_stride, q, k, acc);
    default: return dot_pairs_vnni<R, 1>(w, w_stride, q, k, acc);
  }
}

// The few-row projection on VNNI: tasks of kQuantColBlock features, kDecodeCols of them at a
// time against every row (kQuantRows at a time; the features' packed rows stay in L1 between).
template <typename Store>
void quant_linear_few_rows_vnni(const QuantLinear& a, const Store& store) {
  const int64_t k = a.in_features, n = a.out_features, w_stride = k / 4;
  std::vector<int8_t> q(a.rows * k);
  for (int64_t r = 0; r < a.rows; ++r) pair_blocks(a.q + r * k, k, q.data() + r * k);
  const int64_t col_blocks = (n + kQuantColBlock - 1) / kQuantColBlock;
  at::parallel_for(0, col_blocks, 1, [&](int64_t cb, int64_t ce) {
    const int64_t col_end = std::min(n, ce * kQuantColBlock);
    for (int64_t col = cb * kQuantColBlock; col < col_end; col += kDecodeCols) {
      const int64_t nc = std::min<int64_t>(kDecodeCols, col_end - col);
      for (int64_t r = 0; r < a.rows; r += kQuantRows) {
        const int64_t nr = std::min(kQuantRows, a.rows - r);
        int32_t acc[kQuantRows * kDecodeCols];
        dot_pairs(a.weight + col * w_stride, w_stride, q.data() + r * k, k, nr, nc, acc);
        for (int64_t i = 0; i < nr; ++i) {
          for (int64_t j = 0; j < nc; ++j) store(acc[i * nc + j], r + i, col + j);
        }
      }
    }
  });
}
#endif

// acc[r] = Σ_k q_r[k]·c[k] for `rows` (<= kQuantRows) rows: the few-row dot without VNNI;
// `ahead`: a packed row to prefetch (AVX2), kAheadRows on, a cache line every two blocks.
constexpr int64_t kAheadRows = 4;
inline void dot_codes(const uint8_t* w, const int8_t* q, int64_t q_stride, int64_t blocks,
                      int64_t rows, int32_t* acc, const uint8_t* ahead) {
#if defined(__AVX2__)
  switch (rows) {
    case 4: return dot_codes_maddubs<4>(w, q, q_stride, blocks, acc, ahead);
    case 3: return dot_codes_maddubs<3>(w, q, q_stride, blocks, acc, ahead);
    case 2: return dot_codes_maddubs<2>(w, q, q_stride, blocks, acc, ahead);
    default: return dot_codes_maddubs<1>(w, q, q_stride, blocks, acc, ahead);
  }
#else
  (void)ahead;  // the portable loop takes none: no CPU that runs it was measured
  dot_codes_portable(w, q, q_stride, blocks, rows, acc);
#endif
}

template <typename T>
float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void quant_linear_typed(const QuantLinear& a) {
  const int64_t k = a.in_features, n = a.out_features, blocks = k / kQuantPackUnit;
  const int64_t w_stride = k / 4;
  const T* bias = static_cast<const T*>(a.bias);
  T* preact = static_cast<T*>(a.preact);
  const float ws = a.weight_scale;
  // Per element, from acc = Σ q·t (kernels.h).
  auto finish = [&](int32_t acc, int64_t row, int64_t col) -> T {
    const float s = a.scale[row];
    if (a.quant == Quant::kBitlinear) {
      const float y = round_to<T>(round_to<T>(static_cast<float>(acc)) / (ws * round_to<T>(s)));
      return static_cast<T>(bias == nullptr ? y : y + static_cast<float>(bias[col]));
    }
    const float b = bias == nullptr ? 0.0f : static_cast<float>(bias[col]);
    return static_cast<T>((static_cast<float>(acc) / s + b) * ws);
  };
  const int64_t col_blocks = (n + kQuantColBlock - 1) / kQuantColBlock;
  auto store = [&](int32_t acc, int64_t row, int64_t col) {
    preact[row * a.preact_stride + col] = finish(acc - a.q_sum[row], row, col);
  };
  if (a.rows >= kTiledMinRows) {
#if defined(__AVX512F__)
    // finish for one row's outputs [col, col + count), 16 at a time (the same float
    // operations in the same order, so the same bits as the other kernels).
    auto store_row = [&](const int32_t* acc, int64_t row, int64_t col, int64_t count) {
      T* out = preact + row * a.preact_stride + col;
      const __m512i q_sum = _mm512_set1_epi32(a.q_sum[row]);
      const float s = a.scale[row];
      const __m512 divisor =
          _mm512_set1_ps(a.quant == Quant::kBitlinear ? ws * round_to<T>(s) : s);
      for (int64_t j = 0; j < count; j += 16) {
        const __mmask16 m = count - j >= 16 ? 0xFFFF : (1u << (count - j)) - 1;
        const __m512 v = _mm512_cvtepi32_ps(
            _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, acc + j), q_sum));
        const __m512 b = bias == nullptr ? _mm512_setzero_ps() : load16(bias + col + j, m);
        if (a.quant == Quant::kBitlinear) {
          const __m512 y = round16<T>(_mm512_div_ps(round16<T>(v), divisor));
          store16(out + j, m, bias == nullptr ? y : _mm512_add_ps(y, b));
        } else {
          const __m512 y = _mm512_add_ps(_mm512_div_ps(v, divisor), b);
          store16(out + j, m, _mm512_mul_ps(y, _mm512_set1_ps(ws)));
        }
      }
    };
    if (amx_enabled()) return quant_linear_amx(a, store_row);
#endif
    const int64_t row_block =
        std::max<int64_t>(1, kTiledRowBytes / k / kQuantTileRows) * kQuantTileRows;
    const int64_t row_blocks = (a.rows + row_block - 1) / row_block;
    // Tasks row block-major: a thread's consecutive tasks share their rows of q (in L2).
    at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t tb, int64_t te) {
      uint8_t* const codes = codes_workspace(kQuantColBlock * k);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t r0 = task / col_blocks * row_block;
        const int64_t c0 = task % col_blocks * kQuantColBlock;
        const int64_t r_end = std::min(a.rows, r0 + row_block);
        const int64_t c_end = std::min(n, c0 + kQuantColBlock);
        unpack_codes(a.weight + c0 * w_stride, w_stride, c_end - c0, k, codes);
        for (int64_t col = c0; col < c_end; col += kQuantTileCols) {
          const int64_t nc = std::min<int64_t>(kQuantTileCols, c_end - col);
          for (int64_t r = r0; r < r_end; r += kQuantTileRows) {
            const int64_t nr = std::min<int64_t>(kQuantTileRows, r_end - r);
            int32_t acc[kQuantTileRows * kQuantTileCols];
            dot_tile(codes + (col - c0) * k, a.q + r * k, k, nr, nc, acc);
            for (int64_t i = 0; i < nr; ++i) {
              for (int64_t j = 0; j < nc; ++j) store(acc[i * nc + j], r + i, col + j);
            }
          }
        }
      }
    });
    return;
  }
  // The few-row path (fewer than kTiledMinRows rows: decoding): every weight row read straight
  // from its packed bytes, once per kQuantRows rows.
#if defined(__AVX512F__)
  if (cpu_has_vnni()) return quant_linear_few_rows_vnni(a, store);
#endif
  at::parallel_for(0, col_blocks, 1, [&](int64_t cb, int64_t ce) {
    const int64_t col_end = std::min(n, ce * kQuantColBlock);
#if defined(__AVX2__)
    if (a.rows == 1) {  // decoding one sequence: kDecodeCols features at a time
      for (int64_t col = cb * kQuantColBlock; col < col_end; col += kDecodeCols) {
        const int64_t nc = std::min<int64_t>(kDecodeCols, col_end - col);
        const uint8_t* w = a.weight + col * w_stride;
        // the next group's packed rows, prefetched as they lie: contiguous (docs/design.md,
        // Decisions)
        const uint8_t* ahead =
            col + 2 * kDecodeCols <= n ? w + kDecodeCols * w_stride : nullptr;
        int32_t acc[kDecodeCols];
        static_assert(kDecodeCols == 4);
        switch (nc) {
          case 4: dot_cols_maddubs<4>(w, w_stride, a.q, blocks, acc, ahead); break;
          case 3: dot_cols_maddubs<3>(w, w_stride, a.q, blocks, acc, ahead); break;
          case 2: dot_cols_maddubs<2>(w, w_stride, a.q, blocks, acc, ahead); break;
          default: dot_cols_maddubs<1>(w, w_stride, a.q, blocks, acc, ahead);
        }
        for (int64_t j = 0; j < nc; ++j) store(acc[j], 0, col + j);
      }
      return;
    }
#endif
    for (int64_t col = cb * kQuantColBlock; col < col_end; ++col) {
      const uint8_t* w = a.weight + col * w_stride;
      for (int64_t r = 0; r < a.rows; r += kQuantRows) {
        const int64_t count = std::min(kQuantRows, a.rows - r);
        int32_t acc[kQuantRows];
        // the first pass over this weight row also prefetches the row kAheadRows on, which the
        // hardware prefetcher alone does not keep in flight (docs/design.md, Decisions)
        const uint8_t* ahead =
            r == 0 && col + kAheadRows < n ? w + kAheadRows * w_stride : nullptr;
        dot_codes(w, a.q + r * k, k, blocks, count, acc, ahead);
        for (int64_t j = 0; j < count; ++j) store(acc[j], r + j, col);
      }
    }
  });
}

}  // namespace

void quantize_rows(const QuantizeRows& a) {
  with_dtype(a.dtype, [&](auto tag) { quantize_rows_typed<decltype(tag)>(a); });
}

void quant_linear(const QuantLinear& a) {
  with_dtype(a.dtype, [&](auto tag) { quant_linear_typed<decltype(tag)>(a); });
}

}  // namespace magneto::cpu::MAGNETO_ISA
