"""Build magneto: the pure-Python packages plus the C++/CUDA extension magneto_kernels._C.

The extension always contains the C++ CPU kernels; the CUDA kernels join it when torch was built
with CUDA and nvcc is found. MAGNETO_BUILD_CUDA=1 forces them on (set TORCH_CUDA_ARCH_LIST when
no GPU is visible), MAGNETO_BUILD_CUDA=0 forces them off. Build against the installed torch:

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
    from torch.utils.cpp_extension import CUDA_HOME
    import torch
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch in ("1", "on", "true"):
        if not available:
            raise RuntimeError("MAGNETO_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return available


def _extensions():
    # The API file and the CPU backend always; the CUDA kernels and their orchestration
    # (csrc/cuda/*.cu, csrc/cuda/*.cpp) only in CUDA builds, so a CPU build never compiles code
    # that needs the CUDA runtime.
    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    if not cpp_sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    # C++20 as torch itself (its headers use C++20); -fopenmp: at::parallel_for is an OpenMP
    # template compiled into our kernels. The -Wno-* match torch's own build: GCC warns inside
    # its AVX512 intrinsic headers and at at::vec's pragmas.
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-Wno-maybe-uninitialized",
                 "-Wno-unknown-pragmas", "-Wno-psabi"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        ext = CUDAExtension(
            "magneto_kernels._C",
            cpp_sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs, define_macros=[("MAGNETO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                         "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("magneto_kernels._C", cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        include=["magneto", "magneto.*", "magneto_kernels", "magneto_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.2", "fairscale==0.4.0"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
