// The CPU kernels for the compiler's baseline target (any CPU); at::vec's portable implementation.
#define CPU_CAPABILITY DEFAULT
#define MAGNETO_ISA baseline
#include "cpu/kernels_impl.h"
