// BitNet's tiled integer projection on AMX-INT8 (quant.h's tiled kernel, AVX-512 build only):
// TDPBSSD multiplies a tile of 16 rows × 64 signed bytes by one of 16 × 64 signed bytes laid out
// 4 k per dword (VNNI), accumulating 16 × 16 int32. The first operand is q as it is (16 rows ×
// 64 k, row stride in_features); the second is the codes c = t + 1 (0..2, signed bytes as well),
// unpacked from the 2-bit weight into 16-feature groups of 64-k blocks (amx_pack_codes), so that
// the results come out row-major (row × feature), as preact is.
// Chosen at run time where CPUID lists AMX-INT8 and the OS grants the tile state (arch_prctl),
// unless MAGNETO_CPU_AMX=0; else the vector tiles run.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <immintrin.h>

namespace magneto::cpu::MAGNETO_ISA {
namespace {

constexpr int64_t kAmxTile = 16;     // rows of a tile, and int32 columns of the result
constexpr int64_t kAmxTileK = 64;    // bytes of k per tile row
constexpr int64_t kAmxBlock = 32;    // rows and features per pass: 2 × 2 result tiles
// q's bytes per row block (the rows a task's packed codes serve, in L2 with them): each block
// packs every feature's codes again, so the larger the fewer packs (half of the 2 MiB L2 of
// the CPUs with AMX: docs/design.md, Decisions).
constexpr int64_t kAmxRowBytes = 1 << 20;

// CPUID and the OS's permission (asked once per process), then MAGNETO_CPU_AMX (read per call,
// so that tests can run both kernels in one process).
inline bool amx_enabled() {
  static const bool available = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  const char* env = std::getenv("MAGNETO_CPU_AMX");
  return available && !(env != nullptr && std::strcmp(env, "0") == 0);
}

// The codes of 16 packed weight rows (row stride w_stride bytes, k = in_features; the rows from
// `features` on, if any, zero: their rows are not read) as TDPBSSD's second operand: k/4 rows of
// 64 bytes, row k4 holding each feature's 4 codes at k = 4·k4 .. 4·k4 + 3, so that a 64-k block
// is one contiguous 1 KiB tile. Dword j of a packed 32-byte chunk shifted by 2·i holds a
// feature's codes of k = 128·chunk + 32·i + 4·j .. + 3, so the chunk's 16 rows × 8 dwords are
// transposed to 8 vectors of 16 (one per j, lane f from row f), each giving 4 operand rows.
// The transpose is shuffles in registers: a 16-lane gather per j took longer than the tiles
// themselves at 2048 rows (gathers are slow where the microcode mitigates Gather Data Sampling).
inline void amx_pack_codes(const uint8_t* w, int64_t w_stride, int64_t features, int64_t k,
                           uint8_t* packed) {
  const int64_t live = std::clamp<int64_t>(features, 0, kAmxTile);
  const __m512i mask = _mm512_set1_epi8(3);
  // qwords of the 128-bit lanes 0 and 2 (dwords 0-3 of rows f and f + 8) of a and b
  // interleaved, and of lanes 1 and 3 (dwords 4-7)
  const __m512i low_lanes = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i high_lanes = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int64_t chunk = 0; chunk < k / kQuantPackUnit; ++chunk) {
    auto row = [&](int64_t f) {
      return f < live ? _mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(w + f * w_stride + 32 * chunk))
                      : _mm256_setzero_si256();
    };
    // r[f]: row f's 8 dwords in lanes 0-1, row f + 8's in lanes 2-3
    __m512i r[8], t[8], u[8];
    for (int f = 0; f < 8; ++f) {
      r[f] = _mm512_inserti64x4(_mm512_castsi256_si512(row(f)), row(f + 8), 1);
    }
    // 4 × 4 transposes inside each 128-bit lane: u[d] (d < 4) lane L holds dword d (L even) or
    // d + 4 (L odd) of rows 0-3 (u[d + 4]: rows 4-7), the rows + 8 in lanes 2-3
    for (int g = 0; g < 8; g += 4) {
      for (int p = 0; p < 2; ++p) {
        t[g + 2 * p] = _mm512_unpacklo_epi32(r[g + 2 * p], r[g + 2 * p + 1]);
        t[g + 2 * p + 1] = _mm512_unpackhi_epi32(r[g + 2 * p], r[g + 2 * p + 1]);
      }
      u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
      u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
      u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
      u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int d = 0; d < 4; ++d) {
      for (int half = 0; half < 2; ++half) {
        const int j = d + 4 * half;
        const __m512i bits =
            _mm512_permutex2var_epi64(u[d], half == 0 ? low_lanes : high_lanes, u[d + 4]);
        for (int i = 0; i < 4; ++i) {
          _mm512_storeu_si512(packed + (32 * chunk + 8 * i + j) * kAmxTileK,
                              _mm512_and_si512(_mm512_srli_epi32(bits, 2 * i), mask));
        }
      }
    }
  }
}

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Sets this thread's 8 tiles to 16 rows × 64 bytes.
__attribute__((target("amx-tile"))) inline void amx_configure() {
  AmxConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kAmxTileK;
    config.rows[t] = kAmxTile;
  }
  // GCC 12's _tile_loadconfig declares a read of 8 bytes only, so the stores above would be
  // dropped as dead: the empty asm makes them all visible first.
  __asm__ volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// acc (32 rows × 32 features, int32, row stride 32) = 32 rows of q (row stride q_stride) · two
// consecutive 16-feature groups of amx_pack_codes; tiles 0-3 the results, 4-5 q, 6-7 the codes.
__attribute__((target("amx-tile,amx-int8"), noinline)) void amx_block(
    const int8_t* q, int64_t q_stride, const uint8_t* codes, int64_t k, int32_t* acc) {
  const int64_t group_bytes = kAmxTile * k;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t b = 0; b < k / kAmxTileK; ++b) {
    _tile_loadd(4, q + b * kAmxTileK, q_stride);
    _tile_loadd(5, q + kAmxTile * q_stride + b * kAmxTileK, q_stride);
    const uint8_t* cb = codes + b * kAmxTile * kAmxTileK;
    _tile_loadd(6, cb, kAmxTileK);
    _tile_loadd(7, cb + group_bytes, kAmxTileK);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  constexpr int64_t stride = kAmxBlock * sizeof(int32_t);
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + kAmxTile, stride);
  _tile_stored(2, acc + kAmxTile * kAmxBlock, stride);
  _tile_stored(3, acc + kAmxTile * kAmxBlock + kAmxTile, stride);
}

}  // namespace
}  // namespace magneto::cpu::MAGNETO_ISA
