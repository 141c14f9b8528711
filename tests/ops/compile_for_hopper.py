"""Compiles every Triton kernel for an H100/H200 (sm_90) on a machine without a GPU, and prints one JSON line
per compiled kernel with its resource use. Run by tests/ops/test_kernels_compile_for_hopper.py.

    TRITON_INTERPRET=0 python tests/ops/compile_for_hopper.py

Triton's interpreter, which runs the kernels in CI, is permissive where the compiler is not (types carried
through loops, scalar and block mixing), and it says nothing of registers or shared memory. Here the real
compiler runs through to a cubin, as on the GPU: the launch helpers of rela.kernels are called with CPU
tensors of the shapes and dtypes the GPU tests and the trainer use, with the H200's launch shape (132 SMs),
and JITFunction.run is asked only to compile (warmup=True) against a driver that names the target and
nothing else. cuobjdump (shipped with Triton) reads each cubin's registers, stack, shared and local memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_for_hopper.py compiles the kernels: run it with TRITON_INTERPRET=0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H200_SMS = 132
TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """As much of a Triton driver as JITFunction.run(warmup=True) asks for: a device, a stream, the target."""

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


def compile_only(compiled: list, label: list) -> None:
    """Every launch compiles (and caches) its kernel and records it under the current label; none runs."""
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, label[0], kernel))
        return kernel

    JITFunction.run = compile_instead


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "static_shared": int(fields["SHARED"]),
            "local": int(fields["LOCAL"])}


def loss_inputs(B: int, D: int, dtype: torch.dtype, layout: str) -> list[torch.Tensor]:
    if layout == "slice":  # every other row and a column window, as in the GPU tests
        return [torch.zeros(2 * B, D + 9, dtype=dtype)[::2, 3:3 + D] for _ in range(4)]
    return [torch.zeros(B, D, dtype=dtype) for _ in range(4)]


# (B, D or K, layout): the GPU tests' shapes, and the trainer's (BYOL at 512 x 256, RELA at ResNet-50's 2,048
# features, DINO's 65,536 prototypes). float32 and bf16 everywhere; float64 (the tests' reference precision)
# at one shape.
LOSS_SHAPES = [(1, 1, "contiguous"), (3, 8193, "contiguous"), (70_000, 256, "contiguous"), (512, 2048, "contiguous"),
               (513, 65, "slice")]
DINO_SHAPES = [(1, 1, "contiguous"), (256, 65_536, "contiguous"), (64, 4_096, "contiguous"), (513, 65, "slice")]
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float64, (7, 33, "contiguous"))]


def cases(shapes):
    for dtype, only in DTYPES:
        for shape in ([only] if only else shapes):
            yield dtype, torch.float64 if dtype == torch.float64 else torch.float32, shape


def launch_everything(label: list) -> None:
    """Calls every launch helper; `label[0]` names the case of the launches that follow."""
    from rela.kernels import cosine_loss, dino_loss, ema, launch

    # The GPU's launch shapes, not the interpreter's.
    launch.programs_to_fill = lambda device: 4 * H200_SMS
    dino_loss._launch_shape = lambda device: (4 * H200_SMS, 2048)

    for dtype, acc, (B, D, layout) in cases(LOSS_SHAPES):
        a0, b0, a1, b1 = loss_inputs(B, D, dtype, layout)
        for pairs in ([(a0, b0)], [(a0, b0), (a1, b1)]):  # RELA's loss, BYOL's
            label[0] = f"{str(dtype)[6:]} {B}x{D} {layout}, {len(pairs)} pair(s)"
            _, stats = cosine_loss.cosine_loss_forward(pairs, torch.full((), 1e-8, dtype=acc),
                                                       torch.zeros(1, dtype=torch.int32))
            cosine_loss.cosine_loss_backward(pairs, stats, torch.ones((), dtype=acc))

    for dtype, acc, (B, K, layout) in cases(DINO_SHAPES):
        label[0] = f"{str(dtype)[6:]} {B}x{K} {layout}"
        s1, s2, t1, t2 = loss_inputs(B, K, dtype, layout)
        center, temps = torch.zeros(K, dtype=acc), torch.tensor([10.0, 25.0], dtype=acc)
        counters = torch.zeros(dino_loss.num_tickets(B, K, torch.device("cpu")), dtype=torch.int32)
        _, _, lse = dino_loss.dino_loss_forward(s1, s2, t1, t2, center, temps, counters)
        dino_loss.dino_loss_backward(s1, s2, t1, t2, center, temps, lse, torch.ones((), dtype=acc))

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        target, online = torch.zeros(1000, dtype=dtype), torch.zeros(1000, dtype=dtype)
        for momentum in (0.99, torch.tensor(0.99, dtype=torch.float64 if dtype == torch.float64 else torch.float32)):
            label[0] = f"{str(dtype)[6:]}, momentum {'tensor' if isinstance(momentum, torch.Tensor) else 'float'}"
            ema.ema_launch(target, online, momentum)


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    compiled, label = [], [""]
    compile_only(compiled, label)
    launch_everything(label)
    for name, case, kernel in compiled:
        meta = kernel.metadata
        print(json.dumps({"kernel": name, "case": case, "target": f"sm_{TARGET.arch}", "num_warps": meta.num_warps,
                          "dynamic_shared": meta.shared, **resource_usage(kernel.asm["cubin"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
