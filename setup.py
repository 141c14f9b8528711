"""Builds the package and its C++ extension `rela._C` (pybind11 through torch's cpp_extension, ninja).

The CPU sources in csrc/ are always compiled; csrc/*.cu only when a CUDA toolkit is found and torch is
a CUDA build. Build against the installed torch with `pip install --no-build-isolation -e .`, or let
pip's build isolation install the pinned torch declared in pyproject.toml.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def extensions():
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3", "-std=c++17"]
    define_macros = []
    if use_cuda:
        define_macros.append(("RELA_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "rela._C", cpp_sources + cuda_sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension(
            "rela._C", cpp_sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["rela", "rela.*", "kernels", "kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
