#!/usr/bin/env bash
# The project's one GPU script (docs/design.md, Traps): build the extension, run the GPU tests,
# time the ops — in under 7 minutes on one GPU, so that scarce GPU time goes to measuring.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (logs and tables land in $OUT)
#
# Every stage has its own time limit and log; a failing stage is reported and the next one
# still runs (a broken C++ build must not hide the Triton numbers). Exit status: 0 when every
# stage passed, 1 otherwise. Stage budgets: build 120 s, GPU tests 90 s, benchmarks 200 s
# (plus a few seconds of setup): under 7 minutes in all; then, unless QUICK=1, the interpreter
# op suite on CUDA tensors (100 s more) and compute-sanitizer's memcheck and racecheck on the CUDA
# backend's op tests (150 s each), last so that they cannot delay the measurements.
set -uo pipefail   # no -e: each stage's failure is recorded by stage() and the next still runs

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT"
START=$(date +%s)
FAILED=()

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME SECONDS LOGFILE CMD...
  local name=$1 limit=$2 logfile=$3
  shift 3
  log "── $name (limit ${limit}s) → $logfile"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$logfile" 2>&1 || rc=$?
  tail -n 25 "$OUT/$logfile"
  if [ "$rc" -eq 0 ]; then
    log "   $name: OK"
  else
    [ "$rc" -eq 124 ] && log "   $name: TIMED OUT after ${limit}s" || log "   $name: FAILED (rc=$rc)"
    FAILED+=("$name")
  fi
}

log "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), OUT=$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv \
  > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
PY

# 1. Build magneto_kernels._C (C++ CPU + CUDA kernels) against the installed torch.
stage build 120 build.log env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install --no-build-isolation --no-deps -e .

# 2. GPU tests: every test marked `gpu` (Triton and CUDA backends). Real Triton kernels, not
#    the interpreter: TRITON_INTERPRET=0 overrides the CPU default in tests/conftest.py.
#    MAGNETO_TRITON_AUTOTUNE=0: one GEMM config, so the tests spend no time autotuning.
stage gpu-tests 90 pytest_gpu.log env TRITON_INTERPRET=0 MAGNETO_TRITON_AUTOTUNE=0 \
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/

# 3. Benchmarks, 140 s in all, into $OUT: the report (parity, speed with its floors, memory, the
#    machine: report-cuda-<date>.{md,json,png}), then bench/bench_gpu.py's tables for what the
#    report does not time (rms_norm, ln_linear with an output GELU and with dropout, larger
#    sizes). The defaults fit the budget: MAGNETO_TRITON_AUTOTUNE=0 reuses the kernels the GPU
#    tests compiled (autotuning compiles every config of every flag combination, 5-30 s each),
#    and REPORT_FLAGS leaves out the torch.compile comparators (inductor compiles every case:
#    minutes). For those and tuned kernels, with time to spare:
#    MAGNETO_TRITON_AUTOTUNE=1 REPORT_FLAGS= bash bench/gpu_check.sh
REPORT_FLAGS="${REPORT_FLAGS---skip compile --rounds 5}"
# shellcheck disable=SC2086  # REPORT_FLAGS is a list of flags
stage report 90 report.log env TRITON_INTERPRET=0 \
  MAGNETO_TRITON_AUTOTUNE="${MAGNETO_TRITON_AUTOTUNE:-0}" \
  python3 -m magneto.report --device cuda --out-dir "$OUT" --no-progress $REPORT_FLAGS
stage bench 50 bench.log env TRITON_INTERPRET=0 \
  MAGNETO_TRITON_AUTOTUNE="${MAGNETO_TRITON_AUTOTUNE:-0}" \
  python3 bench/bench_gpu.py --out "$OUT"
# The forward GEMM per dot kind (bf16, tf32, exact fp32) at the report's sizes, timed beside the
# fraction of peak docs/design.md's "Fitting the GPU" model expects, with the registers, spills
# and shared memory the device's compile reports (tests/test_triton_compile.py predicts them
# for sm_80 and sm_90a without a GPU).
stage fitting 60 bench_fitting.log env TRITON_INTERPRET=0 \
  MAGNETO_TRITON_AUTOTUNE="${MAGNETO_TRITON_AUTOTUNE:-0}" \
  python3 bench/bench_gpu.py --fitting --out "$OUT"

# The Hugging Face decoder layers, patched vs unpatched (needs transformers 5.23.0, which the GPU
# machine lacks: carry its wheel and pip install it with --no-deps first).
if python3 -c "import transformers" 2>/dev/null; then
  stage bench-transformers 60 bench_transformers.log env TRITON_INTERPRET=0 \
    MAGNETO_TRITON_AUTOTUNE="${MAGNETO_TRITON_AUTOTUNE:-0}" \
    python3 -m bench.bench_transformers --device cuda
else
  log "── bench-transformers: transformers not installed, skipped"
fi

# 4. Extra, after the measurements (skip with QUICK=1): the full Triton op suite of
#    tests/test_ops.py and tests/test_ops_triton.py (written for the CPU interpreter) on CUDA tensors.
if [ "${QUICK:-0}" != "1" ]; then
  stage triton-ops-on-gpu 100 pytest_triton_cuda.log env TRITON_INTERPRET=0 \
    MAGNETO_TRITON_AUTOTUNE=0 MAGNETO_TEST_DEVICE=cuda \
    python3 -m pytest -q -x -rs -p no:cacheprovider -m "not gpu" -k triton tests/test_ops.py tests/test_ops_triton.py
fi

# 5. Extra (skip with QUICK=1): the CUDA kernels under compute-sanitizer, which sees what the CPU
#    emulation of CI cannot (csrc/cuda_emu: no race detection, no out-of-bounds checks):
#    memcheck (out-of-bounds and misaligned accesses) on the CUDA backend's op tests, racecheck
#    (shared-memory hazards, much slower) on their float32 cases. Torch's own kernels are
#    checked too; any report fails the stage.
SANITIZER=$(command -v compute-sanitizer ||
            echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ "${QUICK:-0}" != "1" ]; then
  if [ -x "$SANITIZER" ]; then
    stage memcheck 150 sanitizer_memcheck.log env TRITON_INTERPRET=0 \
      "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
      python3 -m pytest -q -x -rs -p no:cacheprovider -k cuda tests/test_ops.py \
      tests/test_ops_cuda.py
    stage racecheck 150 sanitizer_racecheck.log env TRITON_INTERPRET=0 \
      "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
      python3 -m pytest -q -x -rs -p no:cacheprovider -k "cuda and dtype0" tests/test_ops.py
  else
    log "── memcheck, racecheck: compute-sanitizer not found, skipped"
  fi
fi

log "total $(( $(date +%s) - START ))s"
if [ "${#FAILED[@]}" -ne 0 ]; then
  log "FAILED stages: ${FAILED[*]}"
  exit 1
fi
log "all stages passed"
