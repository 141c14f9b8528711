"""The kernels compile for an H100 (sm_90: PTX and cubin) on a machine without a GPU.

The interpreter is more forgiving than the compiler (types, scalar branches, reductions); this catches
what only the compiler rejects. Integer and pointer arguments get the divisibility-by-16 hints that a
real launch on aligned tensors would give them.
"""
from __future__ import annotations

import inspect

import pytest
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.cosine_loss import cosine_loss_bwd_kernel, cosine_loss_fwd_kernel
from kernels.ema import BLOCK, ema_kernel

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without these has a different compiler API
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

if "nvidia" not in triton.backends.backends:
    pytest.skip("Triton's NVIDIA backend is not installed", allow_module_level=True)
if isinstance(tl.standard._sum_combine, InterpretedFunction):
    pytest.skip("Triton was imported under TRITON_INTERPRET=1: its own library cannot compile",
                allow_module_level=True)


def compile_for_h100(kernel, types: dict[str, str], constexprs: dict):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if n not in constexprs and (n.endswith("_ptr") or n.startswith("num_") or n == "D")}
    return triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32))


def loss_types(inputs: str, acc: str) -> dict[str, str]:
    types = {f"{x}{i}_ptr": f"*{inputs}" for x in "ab" for i in "01"}
    types.update({"grad_a0_ptr": f"*{inputs}", "grad_a1_ptr": f"*{inputs}", "stats_ptr": f"*{acc}",
                  "partial_ptr": f"*{acc}", "loss_ptr": f"*{acc}", "eps_ptr": f"*{acc}",
                  "grad_loss_ptr": f"*{acc}", "counter_ptr": "*i32"})
    return types


@pytest.mark.parametrize("num_pairs, inputs, acc", [(2, "bf16", "fp32"), (1, "fp16", "fp32"), (2, "fp64", "fp64")])
def test_cosine_loss_kernels_compile_for_sm90(num_pairs, inputs, acc):
    acc_dtype = tl.float64 if acc == "fp64" else tl.float32
    fwd = compile_for_h100(cosine_loss_fwd_kernel, loss_types(inputs, acc), dict(
        NUM_PAIRS=num_pairs, BLOCK_B=8, BLOCK_D=256, BLOCK_P=64, ACC=acc_dtype, FP64=acc == "fp64"))
    bwd = compile_for_h100(cosine_loss_bwd_kernel, loss_types(inputs, acc), dict(
        NUM_PAIRS=num_pairs, BLOCK_B=8, BLOCK_D=256, ACC=acc_dtype))
    assert fwd.asm["cubin"] and bwd.asm["cubin"]
    assert "atom.global" in fwd.asm["ptx"]  # the last-program ticket of the fused reduction


@pytest.mark.parametrize("params, from_ptr", [("fp32", True), ("fp32", False), ("bf16", True), ("fp64", True)])
def test_ema_kernel_compiles_for_sm90_with_vector_loads(params, from_ptr):
    types = {"target_ptr": f"*{params}", "online_ptr": f"*{params}", "target_words_ptr": "*i64",
             "online_words_ptr": "*i64", "momentum_ptr": "*fp32", "weight": "fp32"}
    acc = tl.float64 if params == "fp64" else tl.float32
    kernel = compile_for_h100(ema_kernel, types, dict(
        MOMENTUM_FROM_PTR=from_ptr, EMULATE_FMA=False, ACC=acc, BLOCK=BLOCK))
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"]
    if params != "fp64":  # 16-byte parameter loads, as bandwidth needs (fp64 ones look like the words')
        assert "ld.global.v4.b32" in ptx
    assert "fma.rn.f" in ptx
