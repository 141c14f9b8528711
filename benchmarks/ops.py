"""Are the fused ops faster than what they replace? BYOL/RELA/DINO loss forward+backward and the EMA step.

    python benchmarks/ops.py [--out DIR] [--device cuda|cpu] [--quick]

Each op is timed against its pure-torch reference run eagerly, the same reference under
torch.compile, and for the EMA `torch._foreach_lerp_` + `torch._foreach_copy_` over prebuilt lists
(the strongest eager form), all in one run. The DINO loss (two crops, K-wide heads) reports the bandwidth
its forward+backward would need at the least (read s1, s2, t1, t2 twice, write both gradients) against
the measured device copy. The EMA also reports its achieved bandwidth against a
measured device copy (`dst.copy_(src)` of a large tensor, timed the same way). On the CPU the Triton
kernels do not run (only Triton's interpreter could run them there); the baselines still are timed
so this script keeps working. A benchmark reports, it never asserts: the H100 goals are printed as
met / not met.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, print_table, time_fn, write_json  # noqa: E402
from rela.ops import (byol_loss, byol_loss_reference, dino_loss, dino_loss_reference,  # noqa: E402
                      ema_update_reference_, prepare_ema_, rela_loss, rela_loss_reference)
from rela.ops._dispatch import kernels_unavailable_reason  # noqa: E402

WIDTH = 256
BATCHES = (256, 1024, 4096)
# DINO's head width is 65,536; the CPU times the baselines at a small width.
DINO_SHAPES = {"cuda": ((256, 65_536), (64, 65_536), (256, 4_096)), "cpu": ((64, 4_096),)}
DINO_TEMPS = (0.1, 0.04)  # student, teacher (DINO's)
MOMENTUM = 0.996
GOALS = {  # on an H100
    "byol_loss": {"vs_eager": 3.0, "vs_compile": 1.2},
    "ema": {"vs_foreach": 1.2, "copy_bandwidth_fraction": 0.9},
}


def fwd_bwd(loss_fn, preds, targets):
    """One forward and backward; torch.autograd.grad, so no .grad accumulation kernel is timed."""
    def run():
        torch.autograd.grad(loss_fn(*preds, *targets), preds)
    return run


def try_compile(fn, run_once):
    """torch.compile(fn), or the error message if compiling fails here (e.g. no C++ compiler on CPU)."""
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no dynamic-shape kernels
    try:
        compiled = torch.compile(fn, dynamic=False)
        run_once(compiled)
        return compiled, None
    except Exception as e:  # a benchmark reports what did not work instead of stopping
        torch._dynamo.reset()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def bench_losses(device, dtypes, batches, timing, fused_ok, rows, notes):
    ops = {
        "byol_loss": (lambda p1, p2, z1, z2: byol_loss(p1, p2, z1, z2, fused=True), byol_loss_reference, 2),
        "rela_loss": (lambda y_hat, y: rela_loss(y_hat, y, fused=True), rela_loss_reference, 1),
    }
    for op, (fused_fn, reference, num_preds) in ops.items():
        for dtype in dtypes:
            for batch in batches:
                generator = torch.Generator(device=device).manual_seed(batch)
                preds = [torch.randn(batch, WIDTH, device=device, dtype=dtype, generator=generator,
                                     requires_grad=True) for _ in range(num_preds)]
                targets = [torch.randn(batch, WIDTH, device=device, dtype=dtype, generator=generator)
                           for _ in range(num_preds)]
                shape = f"{batch}x{WIDTH} {str(dtype).removeprefix('torch.')}"
                candidates = {"eager": reference}
                compiled, error = try_compile(reference, lambda f: fwd_bwd(f, preds, targets)())
                if compiled is not None:
                    candidates["compile"] = compiled
                else:
                    notes.append(f"{op} {shape}: torch.compile failed: {error}")
                if fused_ok:
                    candidates["fused"] = fused_fn
                times = {name: time_fn(fwd_bwd(fn, preds, targets), device=device, **timing)["median_ms"]
                         for name, fn in candidates.items()}
                for name, ms in times.items():
                    rows.append({"op": op, "shape": shape, "impl": name, "median_ms": ms,
                                 "vs_eager": times["eager"] / ms,
                                 "vs_compile": times["compile"] / ms if "compile" in times else None})


def bench_dino(device, dtypes, shapes, timing, fused_ok, rows, notes):
    """DINO's loss forward+backward: the loss, the teacher mean and the students' gradients."""
    for dtype in dtypes:
        for batch, width in shapes:
            generator = torch.Generator(device=device).manual_seed(width)
            s1, s2, t1, t2 = (torch.randn(batch, width, device=device, dtype=dtype, generator=generator,
                                          requires_grad=i < 2) for i in range(4))
            center = torch.zeros(width, device=device)
            shape = f"{batch}x{width} {str(dtype).removeprefix('torch.')}"

            def fwd_bwd_dino(fn):
                def run():
                    loss, _ = fn(s1, s2, t1, t2, center, *DINO_TEMPS)
                    torch.autograd.grad(loss, (s1, s2))
                return run

            candidates = {"eager": dino_loss_reference}
            compiled, error = try_compile(dino_loss_reference, lambda f: fwd_bwd_dino(f)())
            if compiled is not None:
                candidates["compile"] = compiled
            else:
                notes.append(f"dino_loss {shape}: torch.compile failed: {error}")
            if fused_ok:
                candidates["fused"] = lambda *a: dino_loss(*a, fused=True)
            times = {name: time_fn(fwd_bwd_dino(fn), device=device, **timing)["median_ms"]
                     for name, fn in candidates.items()}
            least_bytes = 10 * batch * width * s1.element_size()  # 4 inputs read twice, 2 gradients written
            for name, ms in times.items():
                rows.append({"op": "dino_loss", "shape": shape, "impl": name, "median_ms": ms,
                             "vs_eager": times["eager"] / ms,
                             "vs_compile": times["compile"] / ms if "compile" in times else None,
                             "GB/s": least_bytes / (ms * 1e-3) / 1e9})


def copy_bandwidth_gbps(device, numel, timing) -> float:
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device=device, **timing)["median_ms"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_ema(device, timing, fused_ok, rows, notes) -> dict:
    import torchvision

    torch.manual_seed(0)
    online = torchvision.models.resnet50(weights=None).to(device)
    target = copy.deepcopy(online)
    params = list(online.parameters())
    buffers = list(online.buffers())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    # Read target and online, write target; buffers: read online, write target.
    bytes_moved = 3 * param_bytes + 2 * buffer_bytes

    # The baselines run on their own unflattened copies: the layout they would see without rela.ops.
    base_target, base_online = copy.deepcopy(target), copy.deepcopy(online)
    target_params, online_params = list(base_target.parameters()), list(base_online.parameters())
    target_buffers, online_buffers = list(base_target.buffers()), list(base_online.buffers())

    @torch.no_grad()
    def foreach():
        torch._foreach_lerp_(target_params, online_params, 1.0 - MOMENTUM)
        torch._foreach_copy_(target_buffers, online_buffers)

    candidates = {"eager": lambda: ema_update_reference_(base_target, base_online, MOMENTUM),
                  "foreach": foreach}
    compiled, error = try_compile(ema_update_reference_, lambda f: f(base_target, base_online, MOMENTUM))
    if compiled is not None:
        candidates["compile"] = lambda: compiled(base_target, base_online, MOMENTUM)
    else:
        notes.append(f"ema: torch.compile failed: {error}")
    if fused_ok:
        pair = prepare_ema_(target, online, fused=True)  # what the trainer keeps: no per-call module walk
        candidates["fused"] = lambda: pair.update(MOMENTUM)
        momentum = torch.tensor(MOMENTUM, device=device)
        candidates["fused_tensor_m"] = lambda: pair.update(momentum)

    copy_gbps = copy_bandwidth_gbps(device, max(param_bytes // 4, 1 << 26), timing)
    times = {name: time_fn(fn, device=device, **timing)["median_ms"] for name, fn in candidates.items()}
    shape = f"resnet50 {sum(p.numel() for p in params) / 1e6:.1f}M params"
    for name, ms in times.items():
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        rows.append({"op": "ema", "shape": shape, "impl": name, "median_ms": ms,
                     "vs_eager": times["eager"] / ms, "vs_compile": times["compile"] / ms if "compile" in times else None,
                     "vs_foreach": times["foreach"] / ms, "GB/s": gbps, "of_copy_bw": gbps / copy_gbps})
    return {"copy_bandwidth_gbps": copy_gbps, "ema_bytes_moved": bytes_moved}


def goal_report(rows) -> list[dict]:
    report = []
    for row in rows:
        if row["impl"] != "fused" or row["op"] not in GOALS:
            continue
        goals = GOALS[row["op"]]
        checks = {"vs_eager": row.get("vs_eager"), "vs_compile": row.get("vs_compile"),
                  "vs_foreach": row.get("vs_foreach"), "copy_bandwidth_fraction": row.get("of_copy_bw")}
        for name, goal in goals.items():
            value = checks[name]
            report.append({"op": row["op"], "shape": row["shape"], "goal": f"{name} >= {goal}",
                           "value": value, "met": None if value is None else value >= goal})
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                        help=f"BYOL/RELA loss batch sizes (default {' '.join(map(str, BATCHES))}; each one and dtype "
                             f"costs a torch.compile of the reference)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on the CPU (default 1: OpenMP barriers on a busy machine add "
                             "whole scheduler slices to a timing)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    started = time.perf_counter()
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)

    on_gpu = device.type == "cuda"
    timing = ({"warmup": 10, "repeats": 100} if on_gpu else {"warmup": 3, "repeats": 20})
    if args.quick:
        timing = {"warmup": 5, "repeats": 30} if on_gpu else {"warmup": 1, "repeats": 5}
    dtypes = (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,)
    unavailable = kernels_unavailable_reason()
    fused_ok = on_gpu and unavailable is None
    rows, notes = [], []
    if not on_gpu:
        notes.append("fused kernels not timed: they need a GPU (on the CPU only Triton's interpreter runs them)")
    elif unavailable:
        notes.append(f"fused kernels not timed: {unavailable}")

    bench_losses(device, dtypes, args.batches, timing, fused_ok, rows, notes)
    # --quick: DINO's own shape only (each shape and dtype costs a torch.compile of the reference).
    dino_shapes = DINO_SHAPES[device.type][:1] if args.quick else DINO_SHAPES[device.type]
    bench_dino(device, dtypes, dino_shapes, timing, fused_ok, rows, notes)
    ema_info = bench_ema(device, timing, fused_ok, rows, notes)
    for row in rows:
        if row["op"] == "dino_loss":
            row["of_copy_bw"] = row["GB/s"] / ema_info["copy_bandwidth_gbps"]
    goals = goal_report(rows)

    print_table(rows, ["op", "shape", "impl", "median_ms", "vs_eager", "vs_compile", "vs_foreach", "GB/s",
                       "of_copy_bw"])
    print(f"\ndevice copy bandwidth: {ema_info['copy_bandwidth_gbps']:.1f} GB/s (dst.copy_(src), read + write)")
    if goals:
        print("\ngoals (H100):")
        print_table(goals, ["op", "shape", "goal", "value", "met"])
    load = os.getloadavg()[0]
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        notes.append(f"CPU timings are noisy: load average {load:.1f} on {os.cpu_count()} cores")
    for note in notes:
        print(f"note: {note}")
    payload = {"benchmark": "ops", "environment": environment(device), "quick": args.quick,
               "timing": timing, "load_average_1m": load,
               "cpu_threads": torch.get_num_threads(), "rows": rows, "goals": goals, "notes": notes, **ema_info,
               "wall_s": time.perf_counter() - started}
    path = write_json(Path(args.out) / f"ops_{device.type}.json", payload)
    print(f"\nwrote {path} ({payload['wall_s']:.0f}s)")
    return payload


if __name__ == "__main__":
    main()
