"""Builds the package and its C++ extension `rela._C` (pybind11 through torch's cpp_extension, ninja).

The CPU sources in csrc/ are always compiled; csrc/*.cu only when a CUDA toolkit is found and torch is
a CUDA build. Build against the installed torch with `pip install --no-build-isolation -e .`, or let
pip's build isolation install the pinned torch declared in pyproject.toml.

The Triton kernels live in the top-level folder kernels/ and are installed as `rela.kernels`: no
top-level `kernels` package lands in site-packages.
"""
import os
import sys
import warnings
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
# setuptools' build backend runs this file with the backend's folder on sys.path, not this one.
sys.path.insert(0, str(ROOT))
from build_support import decide_from_environment  # noqa: E402  (shipped in the sdist: MANIFEST.in)


def extensions():
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    # torch guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script (/usr/local/bin)
    # the guess has no headers or libraries, so look for a toolkit that does, of torch's CUDA major version
    # (build_support.py). RELA_CPU_ONLY=1 skips CUDA.
    use_cuda, toolkit, reason = decide_from_environment(cpp_extension.CUDA_HOME, bool(cuda_sources),
                                                        torch.version.cuda)
    if use_cuda:
        print(f"rela._C: with CUDA ({reason})")
    elif torch.version.cuda is not None and cuda_sources:
        warnings.warn(f"rela._C without CUDA: {reason}; the raw bank then copies the prior's outputs to the "
                      "host with a sync per batch", stacklevel=1)
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
