// The CPU kernels built for AVX512 (F, BW, VL, DQ) + AVX2/FMA; chosen at run time by dispatch.cpp.
#include "cpu/isa.h"

#if MAGNETO_CPU_X86_VARIANTS
#include "cpu/isa_prelude.h"

// GCC's target pragma enables the instructions but not the feature macros that sleef.h and
// at::vec test, so those are defined by hand for the rest of this file.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,avx,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX2__ 1
#define __AVX__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512 1
#define MAGNETO_ISA avx512
#include "cpu/kernels_impl.h"
#endif
