"""The kernels compile for an H100 (sm_90: PTX and cubin) on a machine without a GPU; and the other
checks that need Triton imported without its interpreter.

The interpreter is more forgiving than the compiler (types, scalar branches, reductions); this catches
what only the compiler rejects. Integer and pointer arguments get the divisibility-by-16 hints that a
real launch on aligned tensors would give them.

Compiling needs Triton imported without TRITON_INTERPRET: under it, Triton's own library (tl.sum, ...)
is interpreted too. In a process that imported Triton interpreted (tests/ops's own, or the README's
single test command on a machine without a GPU) this module runs itself again in a fresh process that
compiles. A Triton without the compiler API or the NVIDIA backend skips these tests, or fails them
when the environment variable CI is set.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from rela.kernels import INTERPRETED
from rela.kernels.cosine_loss import cosine_loss_bwd_kernel, cosine_loss_fwd_kernel
from rela.kernels.ema import BLOCK, ema_kernel
from rela.ops import byol_loss


@pytest.fixture(scope="module")
def compiler():
    """(ASTSource, GPUTarget), when this Triton can compile for sm_90 without a GPU."""
    try:  # imported here: a Triton with another compiler API lacks them, and that is what we report
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        missing = f"this Triton has no ASTSource/GPUTarget ({error})"
    else:
        if "nvidia" in triton.backends.backends:
            return ASTSource, GPUTarget
        missing = "Triton's NVIDIA backend is not installed"
    if os.environ.get("CI"):
        pytest.fail(f"{missing}; CI is set, so the compile tests must run", pytrace=False)
    pytest.skip(missing)


def compile_for_h100(compiler, kernel, types: dict[str, str], constexprs: dict):
    ast_source, gpu_target = compiler
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if n not in constexprs and (n.endswith("_ptr") or n.startswith("num_") or n == "D")}
    return triton.compile(ast_source(kernel, signature, constexprs, aligned), target=gpu_target("cuda", 90, 32))


def loss_types(inputs: str, acc: str) -> dict[str, str]:
    types = {f"{x}{i}_ptr": f"*{inputs}" for x in "ab" for i in "01"}
    types.update({"grad_a0_ptr": f"*{inputs}", "grad_a1_ptr": f"*{inputs}", "stats_ptr": f"*{acc}",
                  "partial_ptr": f"*{acc}", "loss_ptr": f"*{acc}", "eps_ptr": f"*{acc}",
                  "grad_loss_ptr": f"*{acc}", "counter_ptr": "*i32"})
    return types


@pytest.mark.parametrize("num_pairs, inputs, acc", [(2, "bf16", "fp32"), (1, "fp16", "fp32"), (2, "fp64", "fp64")])
def test_cosine_loss_kernels_compile_for_sm90(compiler, num_pairs, inputs, acc):
    acc_dtype = tl.float64 if acc == "fp64" else tl.float32
    fwd = compile_for_h100(compiler, cosine_loss_fwd_kernel, loss_types(inputs, acc), dict(
        NUM_PAIRS=num_pairs, BLOCK_B=8, BLOCK_D=256, BLOCK_P=64, ACC=acc_dtype, FP64=acc == "fp64"))
    bwd = compile_for_h100(compiler, cosine_loss_bwd_kernel, loss_types(inputs, acc), dict(
        NUM_PAIRS=num_pairs, BLOCK_B=8, BLOCK_D=256, ACC=acc_dtype))
    assert fwd.asm["cubin"] and bwd.asm["cubin"]
    assert "atom.global" in fwd.asm["ptx"]  # the last-program ticket of the fused reduction


@pytest.mark.parametrize("params, from_ptr", [("fp32", True), ("fp32", False), ("bf16", True), ("fp64", True)])
def test_ema_kernel_compiles_for_sm90_with_vector_loads(compiler, params, from_ptr):
    types = {"target_ptr": f"*{params}", "online_ptr": f"*{params}", "momentum_ptr": "*fp32", "weight": "fp32"}
    acc = tl.float64 if params == "fp64" else tl.float32
    kernel = compile_for_h100(compiler, ema_kernel, types, dict(
        MOMENTUM_FROM_PTR=from_ptr, EMULATE_FMA=False, ACC=acc, BLOCK=BLOCK))
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"]
    if params != "fp64":  # 16-byte parameter loads, as bandwidth needs
        assert "ld.global.v4.b32" in ptx
    assert "fma.rn.f" in ptx


def test_setting_triton_interpret_after_the_import_changes_nothing(monkeypatch):
    """The kernels were defined compiled, so CPU tensors cannot run them; fused=True says how to."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before Triton is imported"):
        byol_loss(*torch.randn(4, 2, 3), fused=True)


if INTERPRETED:
    # This process cannot compile (see the module docstring): the tests above run in a fresh one instead.
    del (test_cosine_loss_kernels_compile_for_sm90, test_ema_kernel_compiles_for_sm90_with_vector_loads,
         test_setting_triton_interpret_after_the_import_changes_nothing)

    def test_the_checks_above_pass_in_a_process_without_the_interpreter(compiler):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            cwd=Path(__file__).parents[2], env={**os.environ, "TRITON_INTERPRET": "0"},
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert "8 passed" in result.stdout, result.stdout[-3000:]
