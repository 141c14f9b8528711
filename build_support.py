"""What setup.py decides about CUDA, as pure functions a test can call without building anything.

rela._C's .cu files are compiled only when torch is a CUDA build, a CUDA toolkit with headers is found,
RELA_CPU_ONLY is not 1, and the toolkit's major version is torch's: nvcc of another major (a CUDA 13
toolkit beside a cu12x torch, say) produces objects that do not link or load against torch's runtime, and
a failed build makes `pip install` fail where the CPU-only extension would have worked. Every "no" falls
back to the CPU-only extension, with the reason printed as a warning.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path


def find_toolkit(candidates) -> Path | None:
    """The first candidate folder that holds a CUDA toolkit with headers (include/cuda_runtime.h): torch
    guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script without headers or libraries."""
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    return None


def toolkit_version(toolkit: Path) -> str | None:
    """'MAJOR.MINOR' of the toolkit at `toolkit`: version.json (CUDA >= 11.1), else CUDART_VERSION in
    include/cuda_runtime_api.h, else `bin/nvcc --version`; None if none of them says."""
    try:
        info = json.loads((toolkit / "version.json").read_text())
        entry = info.get("cuda") or info["cuda_cudart"]  # {"cuda": {"version": "12.4.1"}, ...}
        major, minor = entry["version"].split(".")[:2]
        return f"{int(major)}.{int(minor)}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        header = (toolkit / "include" / "cuda_runtime_api.h").read_text(errors="replace")
        match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header)
        if match:
            number = int(match.group(1))  # 1000 * major + 10 * minor
            return f"{number // 1000}.{number % 1000 // 10}"
    except OSError:
        pass
    try:
        out = subprocess.run([str(toolkit / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        match = re.search(r"release (\d+)\.(\d+)", out)
        if match:
            return f"{int(match.group(1))}.{int(match.group(2))}"
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _major(version: str) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def cuda_build_decision(torch_cuda: str | None, toolkit: Path | str | None, toolkit_cuda: str | None, *,
                        have_cuda_sources: bool = True, cpu_only: bool = False) -> tuple[bool, str]:
    """(compile the .cu files?, why). `torch_cuda`: torch.version.cuda (None for a CPU build of torch);
    `toolkit`: the toolkit folder found (None: none); `toolkit_cuda`: its 'MAJOR.MINOR' (None: unknown)."""
    if cpu_only:
        return False, "RELA_CPU_ONLY=1: building the CPU-only extension"
    if not have_cuda_sources:
        return False, "no csrc/*.cu sources: building the CPU-only extension"
    if torch_cuda is None:
        return False, "torch is a CPU build (torch.version.cuda is None): building the CPU-only extension"
    if toolkit is None:
        return False, (f"torch is built for CUDA {torch_cuda} but no CUDA toolkit with headers was found "
                       "(CUDA_HOME, CUDA_PATH, /usr/local/cuda): building the CPU-only extension")
    if toolkit_cuda is None:
        return False, (f"the CUDA toolkit at {toolkit} does not say its version (version.json, "
                       "cuda_runtime_api.h, nvcc --version): building the CPU-only extension")
    if _major(toolkit_cuda) is None or _major(toolkit_cuda) != _major(torch_cuda):
        return False, (f"the CUDA toolkit at {toolkit} is CUDA {toolkit_cuda}, torch is built for CUDA "
                       f"{torch_cuda}: the major versions differ, so building the CPU-only extension (point "
                       f"CUDA_HOME at a CUDA {_major(torch_cuda)}.x toolkit for the pinned-ring writer)")
    return True, f"CUDA {toolkit_cuda} toolkit at {toolkit} matches torch's CUDA {torch_cuda}"


def decide_from_environment(cuda_home: str | None, have_cuda_sources: bool, torch_cuda: str | None,
                            environ=os.environ) -> tuple[bool, Path | None, str]:
    """What setup.py decides on this machine: (use_cuda, toolkit, reason)."""
    cpu_only = environ.get("RELA_CPU_ONLY", "0") == "1"
    toolkit = None
    if not cpu_only and torch_cuda is not None:
        toolkit = find_toolkit((cuda_home, environ.get("CUDA_PATH"), "/usr/local/cuda"))
    version = toolkit_version(toolkit) if toolkit is not None else None
    use_cuda, reason = cuda_build_decision(torch_cuda, toolkit, version, have_cuda_sources=have_cuda_sources,
                                           cpu_only=cpu_only)
    return use_cuda, toolkit if use_cuda else None, reason
