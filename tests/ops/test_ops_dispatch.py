"""Which path an op takes: the Triton kernels (interpreted on CPU tensors) or the reference."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rela.kernels.cosine_loss
import rela.kernels.ema
from rela.ops import _dispatch, byol_loss, byol_loss_reference, ema_update_, rela_loss, rela_loss_reference

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
NO_TRITON = "ModuleNotFoundError: No module named 'triton'"


def inputs(B=4, D=8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(B, D, generator=generator) for _ in range(4)]


@pytest.mark.parametrize("fused, device, interpreted, kernels", [
    (None, CUDA, False, True), (None, CPU, False, False), (None, CPU, True, False),
    (False, CUDA, False, False), (False, CPU, True, False),
    (True, CUDA, False, True), (True, CPU, True, True),
])
def test_dispatch_table(monkeypatch, fused, device, interpreted, kernels):
    monkeypatch.setattr(_dispatch, "INTERPRETED", interpreted)
    assert _dispatch.use_kernels(fused, device) is kernels


def test_fused_true_on_cpu_tensors_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before Triton is imported"):
        byol_loss(*inputs(), fused=True)


def test_auto_runs_the_reference_on_cpu_tensors_even_under_the_interpreter(launches):
    p1, p2, z1, z2 = inputs()
    assert torch.equal(byol_loss(p1, p2, z1, z2), byol_loss_reference(p1, p2, z1, z2))
    assert torch.equal(rela_loss(p1, z1), rela_loss_reference(p1, z1))
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9)
    assert launches == []


def test_fused_true_runs_the_kernels_on_cpu_tensors_under_the_interpreter(launches):
    p1, p2, z1, z2 = inputs()
    byol_loss(p1, p2, z1, z2, fused=True)
    rela_loss(p1, z1, fused=True)
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9, fused=True)
    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_fwd_kernel", "ema_kernel"]


@pytest.mark.parametrize("module", [rela.kernels.cosine_loss, rela.kernels.ema], ids=lambda m: m.__name__)
def test_kernels_use_only_public_triton(module):
    """No private names (tl.standard._sum_combine and the like): they change between Triton releases."""
    assert re.findall(r"\b(?:tl|triton)(?:\.\w+)*\._\w+", inspect.getsource(module)) == []


@pytest.fixture
def kernels_did_not_import(monkeypatch):
    """rela.ops as it is where rela.kernels failed to import, before anything warned."""
    monkeypatch.setattr(_dispatch, "HAVE_TRITON", False)
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    monkeypatch.setattr(_dispatch, "KERNELS_IMPORT_ERROR", NO_TRITON)
    monkeypatch.setattr(_dispatch, "_warned_about_reference_on_cuda", False)


def test_auto_on_cuda_without_the_kernels_warns_once_naming_the_import_error(kernels_did_not_import):
    with pytest.warns(RuntimeWarning, match=re.escape(NO_TRITON)) as caught:
        assert _dispatch.use_kernels(None, CUDA) is False
    assert "pure-torch references on CUDA" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the next ops stay quiet
        assert _dispatch.use_kernels(None, CUDA) is False
        assert _dispatch.use_kernels(None, CPU) is False


def test_auto_on_cpu_tensors_without_the_kernels_stays_quiet(kernels_did_not_import):
    """The CPU runs the references anyway: nothing is lost there, so nothing is said."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.use_kernels(None, CPU) is False
        assert _dispatch.use_kernels(False, CUDA) is False


def test_fused_on_without_the_kernels_raises_naming_the_import_error(kernels_did_not_import):
    for device in (CUDA, CPU):
        with pytest.raises(RuntimeError, match=r"--fused-ops on\).*does not import: " + re.escape(NO_TRITON)):
            _dispatch.use_kernels(True, device)


def test_a_blocked_triton_import_is_reported_not_swallowed():
    """A fresh process where `import triton` fails: rela.ops still imports, keeps the error's text, warns on
    CUDA under auto and refuses fused=True."""
    code = """if True:
        import sys, warnings
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from rela.ops import _dispatch, byol_loss
        assert not _dispatch.HAVE_TRITON
        print("ERROR", _dispatch.KERNELS_IMPORT_ERROR)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print("AUTO", _dispatch.use_kernels(None, torch.device("cuda")))
        print("WARNED", len(caught), caught[0].message if caught else None)
        x = torch.randn(2, 3)
        try:
            byol_loss(x, x, x, x, fused=True)
        except RuntimeError as err:
            print("RAISED", err)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line}
    assert lines["ERROR"].startswith("ModuleNotFoundError") and "triton" in lines["ERROR"]
    assert lines["AUTO"] == "False"
    assert lines["WARNED"].startswith("1 ") and "triton" in lines["WARNED"]
    assert "--fused-ops on" in lines["RAISED"] and "triton" in lines["RAISED"]
