// BitNet's tiled integer projection on AMX-INT8 (quant.h's tiled kernel, AVX-512 build only):
// TDPBUSD multiplies a tile of 16 rows × 64 unsigned bytes by one of 16 × 64 signed bytes laid
// out 4 k per dword (VNNI), accumulating 16 × 16 int32. The unsigned operand is the unpacked
// codes as they are (16 output features × 64 k, row stride k); the signed one is q, rearranged
// once per call into 16-row groups of 64-k blocks (amx_pack_q); the result is transposed
// (feature × row) into preact by quant.h's quant_linear_amx. Chosen at run time where CPUID
// lists AMX-INT8 and the OS grants the tile state (arch_prctl), unless MAGNETO_CPU_AMX=0; else
// the vector tiles run.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <ATen/Parallel.h>
#include <immintrin.h>

namespace magneto::cpu::MAGNETO_ISA {
namespace {

constexpr int64_t kAmxTile = 16;     // rows of a tile, and int32 columns of the result
constexpr int64_t kAmxTileK = 64;    // bytes of k per tile row
constexpr int64_t kAmxBlock = 32;    // rows and features per pass: 2 × 2 result tiles

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

// q (rows × k, row stride k) as TDPBUSD's second operand: for each group of 16 of padded_rows
// rows (those past `rows` zero) and each 64-k block, 16 × 64 bytes whose row k4 holds, for each
// of the 16 rows, its 4 bytes at k = 64·block + 4·k4.
inline void amx_pack_q(const int8_t* q, int64_t rows, int64_t padded_rows, int64_t k,
                       int8_t* packed) {
  const int64_t groups = padded_rows / kAmxTile, blocks = k / kAmxTileK;
  at::parallel_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      for (int64_t b = 0; b < blocks; ++b) {
        auto* out = reinterpret_cast<int32_t*>(packed + (g * blocks + b) * kAmxTile * kAmxTileK);
        for (int64_t r = 0; r < kAmxTile; ++r) {
          const int64_t row = g * kAmxTile + r;
          for (int64_t k4 = 0; k4 < kAmxTileK / 4; ++k4) {
            int32_t v = 0;
            if (row < rows) std::memcpy(&v, q + row * k + b * kAmxTileK + 4 * k4, 4);
            out[k4 * kAmxTile + r] = v;
          }
        }
      }
    }
  });
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

// acc (32 features × 32 rows, int32, row stride 32) = codes (32 features, row stride k) · q's
// packed groups g and g + 1 (32 rows); tiles 0-3 the results, 4-5 the codes, 6-7 q.
__attribute__((target("amx-tile,amx-int8"), noinline)) void amx_block(
    const uint8_t* codes, const int8_t* q_groups, int64_t k, int32_t* acc) {
  const int64_t blocks = k / kAmxTileK, group_bytes = blocks * kAmxTile * kAmxTileK;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t b = 0; b < blocks; ++b) {
    _tile_loadd(4, codes + b * kAmxTileK, k);
    _tile_loadd(5, codes + kAmxTile * k + b * kAmxTileK, k);
    const int8_t* qb = q_groups + b * kAmxTile * kAmxTileK;
    _tile_loadd(6, qb, kAmxTileK);
    _tile_loadd(7, qb + group_bytes, kAmxTileK);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  constexpr int64_t stride = kAmxBlock * sizeof(int32_t);
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + kAmxTile, stride);
  _tile_stored(2, acc + kAmxTile * kAmxBlock, stride);
  _tile_stored(3, acc + kAmxTile * kAmxBlock + kAmxTile, stride);
}

}  // namespace
}  // namespace magneto::cpu::MAGNETO_ISA
