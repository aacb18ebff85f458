"""Build magneto: the pure-Python packages plus the C++/CUDA extension magneto_kernels._C.

The extension always contains the C++ CPU kernels; the CUDA kernels join it when torch was built
with CUDA and nvcc is found. MAGNETO_BUILD_CUDA=1 forces them on (set TORCH_CUDA_ARCH_LIST when
no GPU is visible), MAGNETO_BUILD_CUDA=0 forces them off. MAGNETO_BUILD_CUDA_EMU=1 also builds
magneto_kernels._C_emu: the CUDA kernels compiled for the CPU against csrc/cuda_emu, which
MAGNETO_CUDA_EMULATE=1 selects at import (a test vehicle; docs/design.md, Backends and dispatch).
Build against the installed torch:

    pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    paths = glob.glob(os.path.join(HERE, pattern), recursive=True)
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda():
    switch = os.environ.get("MAGNETO_BUILD_CUDA", "auto").lower()
    if switch in ("0", "off", "false"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch in ("1", "on", "true"):
        if not available:
            raise RuntimeError("MAGNETO_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return available


def _extensions():
    # The op layer (csrc/*.cpp) and the CPU backend always; the CUDA backend and kernels
    # (csrc/cuda/*.cpp, csrc/cuda/*.cu) only in CUDA builds, so a CPU build never compiles code
    # that needs the CUDA runtime.
    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    if not cpp_sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # C++20 as torch itself (its headers use C++20); -fopenmp: at::parallel_for is an OpenMP
    # template compiled into our kernels. The -Wno-* match torch's own build: GCC warns inside
    # its AVX512 intrinsic headers and at at::vec's pragmas.
    cxx_flags = [
        "-O3",
        "-g0",
        "-std=c++20",
        "-fopenmp",
        "-Wno-maybe-uninitialized",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",
    ]
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        ext = CUDAExtension(
            "magneto_kernels._C",
            cpp_sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("MAGNETO_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": [
                    "-O3",
                    "-std=c++17",
                    "--use_fast_math",
                    "-lineinfo",
                    "--expt-relaxed-constexpr",
                ],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "magneto_kernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    exts = [ext]
    if os.environ.get("MAGNETO_BUILD_CUDA_EMU", "0").lower() in ("1", "on", "true"):
        exts.append(_emulated_cuda_extension(CppExtension, include_dirs))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _write_if_changed(path, text):
    """Writes only a change, so that ninja recompiles only what changed."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _including_source(path, out_dir):
    """<out_dir>/emu_<dir>_<name>.cpp, a C++ file that includes `path` (a .cpp or a .cu)."""
    rel = os.path.splitext(os.path.relpath(path, os.path.join(HERE, "csrc")))[0]
    out = os.path.join(out_dir, "emu_" + rel.replace(os.sep, "_") + ".cpp")
    _write_if_changed(out, f'#include "{path}"\n')
    return os.path.relpath(out, HERE)


def _emulated_cuda_extension(CppExtension, include_dirs):
    """magneto_kernels._C_emu: the checks, the registration and the CUDA backend and kernels as
    host C++ against csrc/cuda_emu (which stands in for the CUDA headers), with a module of its
    own (csrc/cuda_emu/module.cpp). The .cu files compile as they are (csrc/cuda/common.cuh's
    launch_kernel and dynamic_shared). -O2 as a release build of the kernels would have (what the
    strict-aliasing defect showed up at): the four kernel files take about 15 s at -O2 on one
    core, the torch-including files most of the build."""
    out_dir = os.path.join(HERE, "build", "cuda_emu_src")
    os.makedirs(out_dir, exist_ok=True)
    # Each file _C compiles too, and each .cu, included from a .cpp of its own: their objects
    # then have paths of their own (the two extensions do not rebuild each other's), and the .cu
    # files compile as C++.
    included = ["csrc/checks.cpp", "csrc/register.cpp"] + _sources("csrc/cuda/*.cpp")
    included += _sources("csrc/cuda/*.cu")
    sources = [_including_source(os.path.join(HERE, p), out_dir) for p in included]
    sources += _sources("csrc/cuda_emu/*.cpp")
    flags = ["-O2", "-g0", "-std=c++20", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    return CppExtension(
        "magneto_kernels._C_emu",
        sources,
        include_dirs=[os.path.join(HERE, "csrc", "cuda_emu", "include")] + include_dirs,
        define_macros=[("MAGNETO_WITH_CUDA", "1"), ("MAGNETO_CUDA_EMULATE", "1")],
        extra_compile_args={"cxx": flags},
    )


def _readme():
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


ext_modules, cmdclass = _extensions()

setup(
    name="magneto",
    version="0.1.0",
    description="Fused Sub-LayerNorm kernels and modules for Magneto (Foundation Transformer) "
    "models",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(
        include=["magneto", "magneto.*", "magneto_kernels", "magneto_kernels.*"]
    ),
    python_requires=">=3.10",
    # What is tested, exactly: CI runs torch 2.13 (the CPU build) and, for Triton, the oldest and
    # the newest admitted release (Makefile: TRITON_OLDEST, TRITON_NEWEST). The GPU machine's
    # torch 2.11 is exercised only by bench/gpu_check.sh, which installs with --no-deps; it is
    # admitted once that has passed.
    install_requires=["torch>=2.13,<2.14", "numpy"],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "transformers": ["transformers>=5.18.0,<5.24"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3.8",
            "hypothesis>=6",
            "triton>=3.6,<3.10",
            "fairscale==0.4.0",
            "transformers==5.23.0",
            "peft==0.21.2",
        ],
        "bench": ["pytest-benchmark>=4", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
