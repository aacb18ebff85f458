// Stands in for the CUDA header of this name in the emulated build (csrc/cuda_emu/cuda_emu.h).
#pragma once
#include "cuda_emu/cuda_emu.h"
