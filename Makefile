# The README's two Quickstart commands: `make demo` (the main job) and `make test` (the suite).
# Both install what they need first, into the current Python (a venv is up to you), on a CPU
# machine: torch is pinned to the CPU build and the extension builds against it without build
# isolation (an isolated build would pull a multi-GB CUDA torch).
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check

.PHONY: setup demo test bench-cpu

setup:
	$(PIP) install -q torch==2.13.0 numpy ninja pybind11 setuptools wheel
	$(PIP) install -q triton==3.6.0 fairscale==0.4.0 "pytest>=8" "pytest-benchmark>=4" matplotlib tqdm
	# torchscale (the reference implementation) pins timm, whose torchvision needs a CUDA torch:
	# install it without dependencies; tests provide a labelled stand-in for the one timm function.
	$(PIP) install -q --no-deps torchscale==0.3.0
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: setup
	$(PYTHON) -m magneto.demo

test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

bench-cpu: setup
	$(PYTHON) bench/bench_cpu.py --threads 1 2 --rounds 31
