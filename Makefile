# The README's two Quickstart commands: `make report` (the main job: the parity-and-speed report)
# and `make test` (the suite).
# Both install what they need first, into the current Python (a venv is up to you), on a CPU
# machine: torch is pinned to the CPU build and the extension builds against it without build
# isolation (an isolated build would pull a multi-GB CUDA torch).
#
# Installs are remembered in .stamps/ (one set per Python interpreter): `make test` on a warm
# tree reinstalls nothing and rebuilds the extension only when csrc/ or setup.py changed.
# `make clean` forgets them.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMPS := .stamps/$(subst /,_,$(shell command -v $(PYTHON)))
EXT_SOURCES := setup.py $(shell find csrc -type f)
# Every stage runs its tests in one worker process per CPU (pytest-xdist): most of the suite
# is single-threaded Python (the Triton interpreter, the float64 references, compiler runs).
# worksteal: each worker takes a contiguous half of the collection (a module's tests, and its
# module-scoped fixtures such as the gloo worlds, mostly stay on one worker) and an idle worker
# takes half of the other's queue; tests/conftest.py puts the long single tests first.
JOBS ?= $(shell nproc)
PYTEST := TRITON_INTERPRET=1 $(PYTHON) -m pytest -n $(JOBS) --dist worksteal
CPU_SUITE := tests/test_ops_cpu.py tests/test_ops.py tests/test_group.py tests/test_ops_edges.py \
	tests/test_ops_properties.py tests/test_quant_op.py tests/test_quant_group.py \
	tests/test_tensor_parallel_fused.py tests/test_int8_head.py tests/test_decode_attention.py \
	-k cpu
# The tests that choose the build themselves (MAGNETO_CPU_ISA of a process of their own): the
# main stage runs them; under an instruction-set stage they would run the same builds again.
CPU_SUITE += $(addprefix --deselect tests/test_ops_cpu.py::,test_instruction_set_builds \
	test_instruction_set_fallback_is_said test_unknown_instruction_set_is_refused)

# The newest Triton's stage: every launch's ahead-of-time compile for sm_80 and sm_90a checked
# (tests/test_triton_compile.py: compiled where tests/triton_compiled.json lacks its result) and
# every kernel branch run in the interpreter against float64.
# Cases that only repeat branches other cases take are left to the main stage (oldest Triton):
# ln_linear's CUDA option combinations (marked repeats_path in tests/harness.py) and the wide
# rows' chunked statistics in two of their three dtypes (each of the two kept runs in one dtype,
# fp32 and fp16, and the dtype's loads and casts are in every other case).
TRITON_NEWEST_SUITE := tests/test_ops.py tests/test_ops_triton.py tests/test_triton_compile.py \
	tests/test_quant_op.py tests/test_group.py tests/test_quant_group.py \
	tests/test_tensor_parallel_quant.py -k "triton or compile" -m "not repeats_path"
TRITON_NEWEST_SUITE += $(foreach id,layer-gelu-none-0.7-0.0-True-fp32-dtype1 \
	layer-gelu-none-0.7-0.0-True-fp32-dtype2 layer-relu2_glu-none-0.7-0.0-True-fp32-dtype0 \
	layer-relu2_glu-none-0.7-0.0-True-fp32-dtype1,--deselect "tests/test_ops.py::test_ln_linear[triton-2-9000-3-$(id)]")

.PHONY: setup report test quick lint format cuda-check bench bench-cpu bench-isa gpu-check clean

# Two jobs: the extension's build (compiler-bound) runs while pip fetches and unpacks the test
# and benchmark packages, and the other Triton and transformers (network- and disk-bound). Each
# target's prerequisites say what it needs; the recipes of `test` still run one after another.
# Not with `clean` among the goals (`make clean test` must not build while it deletes).
ifeq ($(filter clean,$(MAKECMDGOALS)),)
MAKEFLAGS += -j2
endif

# Every pin in one place: CI installs exactly these. Triton: the oldest and the newest release
# setup.py admits (triton>=3.6,<3.10) are both tested.
# What the extension's build needs (torch's headers and build helpers), then the rest.
$(STAMPS)/build-deps: Makefile
	$(PIP) install -q torch==2.13.0 numpy ninja pybind11 setuptools wheel
	@mkdir -p $(@D) && touch $@

TRITON_OLDEST := 3.6.0
$(STAMPS)/deps: $(STAMPS)/build-deps
	$(PIP) install -q triton==$(TRITON_OLDEST) fairscale==0.4.0 "pytest>=8" "pytest-benchmark>=4" \
		pytest-xdist==3.8.0 \
		matplotlib tqdm ruff==0.17.6 transformers==5.23.0 peft==0.21.2 "hypothesis>=6"
	# torchscale (the reference implementation) pins timm, whose torchvision needs a CUDA torch:
	# install it without dependencies; magneto ships a labelled stand-in for the one timm function.
	$(PIP) install -q --no-deps torchscale==0.3.0
	@mkdir -p $(@D) && touch $@

# The newest Triton setup.py admits, installed into a folder of its own and put first on
# PYTHONPATH for its stage (the oldest, TRITON_OLDEST, is the one installed above): the Triton
# kernels are tested under both. A folder, not a nested venv: a venv made from inside a venv
# sees the base interpreter's packages, not the outer venv's (no torch there).
TRITON_NEWEST := 3.9.0
TRITON_NEWEST_DIR := .triton-$(TRITON_NEWEST)
$(STAMPS)/triton-newest: $(STAMPS)/deps
	rm -rf $(TRITON_NEWEST_DIR)
	$(PIP) install -q --no-deps --target $(TRITON_NEWEST_DIR) triton==$(TRITON_NEWEST)
	@touch $@

# The oldest transformers the Hugging Face integration admits (TRANSFORMERS_RANGE in
# magneto/integrations/transformers; the newest is the pin above), in a folder of its own put
# first on PYTHONPATH for the integration's tests. Its dependency pins equal the pinned one's.
TRANSFORMERS_OLDEST := 5.18.0
TRANSFORMERS_OLDEST_DIR := .transformers-$(TRANSFORMERS_OLDEST)
$(STAMPS)/transformers-oldest: $(STAMPS)/deps
	rm -rf $(TRANSFORMERS_OLDEST_DIR)
	$(PIP) install -q --no-deps --target $(TRANSFORMERS_OLDEST_DIR) \
		transformers==$(TRANSFORMERS_OLDEST)
	@touch $@

# MAGNETO_BUILD_CUDA_EMU=1: also magneto_kernels._C_emu, the CUDA kernels built for the CPU
# (csrc/cuda_emu), which the suite runs under MAGNETO_CUDA_EMULATE=1.
$(STAMPS)/ext: $(STAMPS)/build-deps $(EXT_SOURCES)
	MAGNETO_BUILD_CUDA_EMU=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

setup: $(STAMPS)/ext $(STAMPS)/deps

# Parity against float64 and torchscale, speed ratios against eager, torchscale, torch.compile
# and the GEMM floor, memory, machine: bench/results/report-<device>-<dtype>-<date>.{md,json,png},
# once with the speed sections in float32 and once in bfloat16 (~7 minutes on 2 Sapphire Rapids
# cores, ~30 on 2 AVX2 Zen 3 ones, whose bf16 comparators run torch's generic bf16 loops).
report: setup
	$(PYTHON) -m magneto.report --dtype float32
	$(PYTHON) -m magneto.report --dtype bfloat16

# The whole suite, with the lint and format checks first (they take a second); then the Triton
# kernels again under the newest admitted Triton; then the op
# suite on the CUDA kernels executed on the CPU (MAGNETO_CUDA_EMULATE=1, which must be set before
# import, hence its own process; MAGNETO_EXPECTED_BACKENDS makes it fail, not skip, if the
# emulated build is missing); then the C++ op suite again under each narrower instruction-set
# build this CPU supports, with torch's own kernels (ATen, oneDNN, MKL) held to the same
# instruction set, so that what an AVX2-only or a baseline x86-64 machine runs is tested here too.
test: setup lint $(STAMPS)/triton-newest $(STAMPS)/transformers-oldest
	$(PYTEST) -q
	@echo "== Triton kernels under Triton $(TRITON_NEWEST)"
	PYTHONPATH=$(TRITON_NEWEST_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -c \
		"import triton; assert triton.__version__ == '$(TRITON_NEWEST)', triton.__version__"
	PYTHONPATH=$(TRITON_NEWEST_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTEST) -q -p no:cacheprovider \
		$(TRITON_NEWEST_SUITE)
	@echo "== Hugging Face integration under transformers $(TRANSFORMERS_OLDEST)"
	PYTHONPATH=$(TRANSFORMERS_OLDEST_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -c \
		"import transformers as t; assert t.__version__ == '$(TRANSFORMERS_OLDEST)', t.__version__"
	PYTHONPATH=$(TRANSFORMERS_OLDEST_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTEST) -q \
		-p no:cacheprovider tests/test_integrations_transformers*.py
	@echo "== op suite on the emulated CUDA backend"
	MAGNETO_CUDA_EMULATE=1 MAGNETO_EXPECTED_BACKENDS=reference,cuda $(PYTEST) -q \
		-p no:cacheprovider tests/test_ops.py tests/test_ops_cuda_emu.py tests/test_reference.py \
		tests/test_ops_edges.py tests/test_ops_properties.py tests/test_autocast.py \
		tests/test_torch_func.py tests/test_residual_in_fp32.py tests/test_group.py \
		tests/test_quant_op.py tests/test_quant_group.py tests/test_tensor_parallel_fused.py \
		tests/test_tensor_parallel_quant.py \
		-k "cuda or expected_backends"
	@isas=$$($(PYTHON) -c "from magneto_kernels import _C; print(*_C.cpu_isas()[1:])") || exit 1; \
	for isa in $$isas; do \
		echo "== C++ op suite, MAGNETO_CPU_ISA=$$isa"; \
		tools/with_cpu_isa.sh $$isa $(PYTEST) -q -p no:cacheprovider $(CPU_SUITE) || exit 1; \
	done

quick: setup
	$(PYTEST) -q -x -k "not triton"

lint: $(STAMPS)/deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMPS)/deps
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# nvcc compile of csrc/cuda for sm_80 and sm_90a, failing on warnings and register spills; it
# compiles even where tests/cuda_compiled.json has the results (which the test suite then reads).
cuda-check:
	$(PYTHON) tools/check_cuda.py --no-cache

# pytest-benchmark suites (not part of the test run), backends side by side per op and pass.
bench: setup
	$(PYTHON) -m pytest bench --benchmark-group-by=group -q

bench-cpu: setup
	$(PYTHON) bench/bench_cpu.py --threads 1 2 --rounds 31

# The report's speed sections (ops, layers, decode) once per instruction set this CPU supports,
# magneto's kernels and torch's held to it (tools/with_cpu_isa.sh), one thread (process CPU
# time: robust to a shared machine): bench/results/isa-<isa>/.
bench-isa: setup
	@isas=$$($(PYTHON) -c "from magneto_kernels import _C; print(*_C.cpu_isas())") || exit 1; \
	for isa in $$isas; do \
		tools/with_cpu_isa.sh $$isa $(PYTHON) -m magneto.report --sections ops layers decode \
			--threads 1 --no-progress --out-dir bench/results/isa-$$isa || exit 1; \
	done

# On a CUDA machine: build, GPU tests and GPU benchmarks, logs under $(OUT).
gpu-check:
	OUT=$(or $(OUT),bench/results/gpu) bash bench/gpu_check.sh

clean:
	rm -rf .stamps build *.egg-info magneto_kernels/_C*.so .pytest_cache .ruff_cache .triton-* .transformers-*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
