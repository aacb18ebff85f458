// Headers that at::vec pulls in, included by kernels_avx2.cpp / kernels_avx512.cpp *before* their
// `#pragma GCC target`: their inline functions are shared (merged by the linker) with every other
// translation unit, so they must be compiled for the baseline target, never for AVX2/AVX512.
// Only at::vec itself (in its own CPU_CAPABILITY namespace) and our kernels follow the pragma.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <complex>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <vector>

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
