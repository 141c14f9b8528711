"""setup.py's CUDA decision (build_support.py): the .cu files are compiled only for a CUDA torch with a
toolkit of the same major version, else the CPU-only extension is built with the reason; rela._C says
which one it is; the sdist carries the helper setup.py imports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from build_support import cuda_build_decision, decide_from_environment, find_toolkit, toolkit_version  # noqa: E402


def _toolkit(root: Path, *, version_json: str | None = None, cudart: int | None = None,
             nvcc_release: str | None = None) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("// headers\n")
    if version_json is not None:
        (root / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": version_json},
                                                        "cuda_cudart": {"version": version_json + ".1"}}))
    if cudart is not None:
        (root / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION  {cudart}\n")
    if nvcc_release is not None:
        (root / "bin").mkdir()
        nvcc = root / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n")
        nvcc.chmod(0o755)
    return root


@pytest.mark.parametrize("torch_cuda,toolkit_cuda,expected", [
    ("12.8", "12.4", True), ("12.4", "12.9", True), ("13.0", "13.0", True),  # same major: CUDA build
    ("12.8", "13.0", False), ("13.0", "12.6", False), ("11.8", "12.1", False),  # majors differ: CPU-only
])
def test_compiles_cuda_only_when_the_major_versions_agree(torch_cuda, toolkit_cuda, expected):
    use_cuda, reason = cuda_build_decision(torch_cuda, Path("/opt/cuda"), toolkit_cuda)
    assert use_cuda is expected
    if not expected:
        assert "major versions differ" in reason and torch_cuda in reason and toolkit_cuda in reason


@pytest.mark.parametrize("kwargs,torch_cuda,toolkit,words", [
    ({}, "12.8", None, "no CUDA toolkit"),
    ({}, None, "/opt/cuda", "CPU build"),
    ({"cpu_only": True}, "12.8", "/opt/cuda", "RELA_CPU_ONLY=1"),
    ({"have_cuda_sources": False}, "12.8", "/opt/cuda", "no csrc/*.cu"),
])
def test_falls_back_to_the_cpu_extension_with_the_reason(kwargs, torch_cuda, toolkit, words):
    use_cuda, reason = cuda_build_decision(torch_cuda, toolkit, "12.8", **kwargs)
    assert use_cuda is False and words in reason and "CPU-only" in reason


def test_unknown_toolkit_version_falls_back():
    use_cuda, reason = cuda_build_decision("12.8", "/opt/cuda", None)
    assert use_cuda is False and "does not say its version" in reason


def test_toolkit_version_from_version_json_header_or_nvcc(tmp_path):
    assert toolkit_version(_toolkit(tmp_path / "a", version_json="12.4.1", cudart=11080)) == "12.4"
    assert toolkit_version(_toolkit(tmp_path / "b", cudart=13000, nvcc_release="12.1")) == "13.0"
    assert toolkit_version(_toolkit(tmp_path / "c", cudart=12060)) == "12.6"
    assert toolkit_version(_toolkit(tmp_path / "d", nvcc_release="11.8")) == "11.8"
    assert toolkit_version(_toolkit(tmp_path / "e")) is None


def test_find_toolkit_skips_folders_without_headers(tmp_path):
    wrapper_only = tmp_path / "usr_local"  # like /usr/local with a bin/nvcc wrapper and no include/
    (wrapper_only / "bin").mkdir(parents=True)
    real = _toolkit(tmp_path / "cuda", cudart=12080)
    assert find_toolkit([None, str(wrapper_only), str(real)]) == real
    assert find_toolkit([str(wrapper_only)]) is None


def test_decision_from_the_environment(tmp_path):
    other_major = _toolkit(tmp_path / "cuda13", cudart=13000)
    same_major = _toolkit(tmp_path / "cuda12", cudart=12040)
    assert decide_from_environment(str(same_major), True, "12.8", environ={})[:2] == (True, same_major)
    use_cuda, toolkit, reason = decide_from_environment(str(other_major), True, "12.8", environ={})
    assert (use_cuda, toolkit) == (False, None) and "13.0" in reason
    assert decide_from_environment(str(same_major), True, "12.8", environ={"RELA_CPU_ONLY": "1"})[0] is False
    assert decide_from_environment(str(same_major), True, None, environ={})[0] is False


def test_extension_says_whether_it_was_built_with_cuda():
    """rela._C.built_with_cuda() is what setup.py decides on this machine (here: CUDA 13.0 toolkit under
    /usr/local/cuda and torch cu130, so True; a CPU torch or RELA_CPU_ONLY=1 at build time gives False)."""
    from torch.utils import cpp_extension

    _C = pytest.importorskip("rela._C")
    expected, _, reason = decide_from_environment(cpp_extension.CUDA_HOME, True, torch.version.cuda)
    assert _C.built_with_cuda() is expected, reason
    assert _C.with_cuda is _C.built_with_cuda()


def test_sdist_ships_the_helper_setup_py_imports(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("setup.py", "build_support.py", "MANIFEST.in", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for folder in ("csrc", "rela", "kernels"):
        shutil.copytree(REPO / folder, tree / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "RELA_CPU_ONLY": "1"}
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"setup.py", "build_support.py", "csrc/bank_writer.h", "csrc/cuda_copy.cu"} <= names
