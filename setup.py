"""Builds the package and its C++ extension `rela._C` (pybind11 through torch's cpp_extension, ninja).

The CPU sources in csrc/ are always compiled; csrc/*.cu only when a CUDA toolkit is found and torch is
a CUDA build. Build against the installed torch with `pip install --no-build-isolation -e .`, or let
pip's build isolation install the pinned torch declared in pyproject.toml.

The Triton kernels live in the top-level folder kernels/ and are installed as `rela.kernels`: no
top-level `kernels` package lands in site-packages.
"""
import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent


def extensions():
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    # torch guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script (/usr/local/bin)
    # the guess has no headers or libraries, so look for a toolkit that does. RELA_CPU_ONLY=1 skips CUDA.
    toolkit = None
    if cuda_sources and torch.version.cuda is not None and os.environ.get("RELA_CPU_ONLY", "0") != "1":
        for home in (cpp_extension.CUDA_HOME, os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
                toolkit = Path(home)
                break
    use_cuda = toolkit is not None
    # torch 2.14 headers need C++20; hidden visibility as pybind11 recommends (and silences its warnings).
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    define_macros = []
    if use_cuda:
        define_macros.append(("RELA_WITH_CUDA", None))
        # The .cu files hold host code only (CUDA runtime calls, no kernels), so one arch is enough; an
        # explicit arch also stops torch from guessing the list, which fails where no GPU is visible.
        nvcc_flags = ["-O3", "-std=c++20"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags.append("-arch=sm_80")
        ext = cpp_extension.CUDAExtension(
            "rela._C", cpp_sources + cuda_sources, define_macros=define_macros,
            include_dirs=[str(toolkit / "include")], library_dirs=[str(toolkit / "lib64")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = cpp_extension.CppExtension(
            "rela._C", cpp_sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["rela", "rela.*"]) + ["rela.kernels"],
    package_dir={"rela.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
