"""One timing helper for every benchmark: warm-up, many repeats, the median.

On CUDA each repeat is timed with CUDA events; on the CPU with perf_counter. `interleaved` times several
methods round-robin, so that a change of load on a shared machine hits all of them alike. A benchmark
reports, it never asserts a speed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def time_fn(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 10,
            repeats: int = 50) -> dict:
    """Times `fn()`; returns {'median_ms', 'p10_ms', 'p90_ms', 'repeats'}."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times_ms = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    times_ms.sort()
    return {
        "median_ms": statistics.median(times_ms),
        "p10_ms": times_ms[int(0.1 * (len(times_ms) - 1))],
        "p90_ms": times_ms[int(0.9 * (len(times_ms) - 1))],
        "repeats": repeats,
    }


def interleaved(methods: dict, rounds: int, device: torch.device) -> dict[str, dict]:
    """Times every method once per round, round-robin after one warm-up each, so that a change of load on a
    shared machine hits all of them alike. methods: name -> (fn, repeats per round, whose median is a sample)."""
    samples = {name: [] for name in methods}
    for fn, _ in methods.values():
        fn()
    for _ in range(rounds):
        for name, (fn, repeats) in methods.items():
            samples[name].append(time_fn(fn, device=device, warmup=0, repeats=repeats)["median_ms"])
    summary = {}
    for name, times in samples.items():
        times = sorted(times)
        summary[name] = {"median_ms": statistics.median(times), "p10_ms": times[int(0.1 * (len(times) - 1))],
                         "p90_ms": times[int(0.9 * (len(times) - 1))], "repeats": len(times)}
    return summary


def current_commit() -> str:
    """RELA_COMMIT where it is set (a copy of the tree without .git, as on the lent GPU machine), else git's HEAD."""
    if os.environ.get("RELA_COMMIT"):
        return os.environ["RELA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    """Device, versions, commit and date: what every results JSON carries."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    commit = current_commit()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "torchvision", "nvidia.dali"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed, or broken: the report says so instead of failing
            versions[module] = None
    versions["cuda"] = torch.version.cuda  # the CUDA torch was built with (None for a CPU-only build)
    return {"device": name, "device_type": device.type, "versions": versions, "commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path
