#!/bin/sh
# with_cpu_isa.sh ISA COMMAND...: runs COMMAND with magneto's CPU kernels (MAGNETO_CPU_ISA) and
# torch's own CPU kernels (ATen, oneDNN, MKL) held to the instruction set ISA (avx512, avx2 or
# default; avx512 leaves torch's unrestricted), so that an AVX-512 machine runs what an AVX2-only or a baseline x86-64 one runs.
# `make test` runs the C++ op suite through it, `make bench-isa` the report's speed sections.
set -eu
isa=$1
shift
case $isa in
  avx512) torch_isa="" ;;  # the widest: torch's kernels unrestricted
  avx2) torch_isa="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" ;;
  default) torch_isa="ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2" ;;
  *) echo "with_cpu_isa.sh: ISA must be avx512, avx2 or default, got '$isa'" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # torch_isa is a list of NAME=VALUE words
exec env MAGNETO_CPU_ISA="$isa" $torch_isa "$@"
