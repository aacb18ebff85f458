// Which instruction-set builds of the CPU kernels exist: AVX512 and AVX2 variants on x86-64 with
// GCC (compiled through `#pragma GCC target`), and always a portable one.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MAGNETO_CPU_X86_VARIANTS 1
#else
#define MAGNETO_CPU_X86_VARIANTS 0
#endif
