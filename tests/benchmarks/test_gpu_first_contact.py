"""benchmarks/gpu_first_contact.sh, the first device call: its time plan fits the call and is the one the script
runs, and a rehearsal on the CPU (--tiny) leaves what a device call can bring back: at most 8 files, at most
2 folders deep, plain names, each JSON naming the device, versions, commit and date."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_first_contact.sh"
CALL_LIMIT_S = 540  # the brief: one device call of at most 9 minutes, install included
MAX_FILES, MAX_FOLDERS, NAME = 8, 2, re.compile(r"[A-Za-z0-9._-]+")
STEP_CALL = re.compile(r"^(run_step|cuda_step|background_step)\s+(\w+)\s+(\d+)\b", re.M)


def time_plan(text: str) -> tuple[dict[str, tuple[int, str]], int]:
    """The header's `# plan NAME SECONDS REMARK` lines: {name: (seconds, remark)}, and the stated total."""
    plan = {m[1]: (int(m[2]), m[3].strip()) for m in re.finditer(r"^#\s+plan\s+(\w+)\s+(\d+)(.*)$", text, re.M)}
    total, _ = plan.pop("total")
    return plan, total


def plan_problems(text: str) -> list[str]:
    """What is wrong with the script's time plan: its wall-clock (the background step beside the steps that
    run with it, then the rest in a row) against the stated total and the call's limit, and each step's
    timeout in the script against the plan's."""
    plan, total = time_plan(text)
    background = sum(s for s, remark in plan.values() if remark.startswith("background"))
    beside = sum(s for s, remark in plan.values() if remark.startswith("beside"))
    in_a_row = sum(s for s, remark in plan.values() if not remark.startswith(("background", "beside")))
    wall = max(background, beside) + in_a_row
    problems = []
    if wall != total:
        problems.append(f"the plan's steps take {wall} s, its total says {total} s")
    if wall >= CALL_LIMIT_S:
        problems.append(f"the plan takes {wall} s, not under {CALL_LIMIT_S} s")
    calls = [(m[2], int(m[3])) for m in STEP_CALL.finditer(text)]
    if [name for name, _ in calls] != list(plan):
        problems.append(f"the script runs {[n for n, _ in calls]}, the plan lists {list(plan)}")
    for name, seconds in calls:
        if name in plan and plan[name][0] != seconds:
            problems.append(f"{name}: the script gives it {seconds} s, the plan {plan[name][0]} s")
    if not re.search(rf"^BUDGET=\$\(\({CALL_LIMIT_S} \* scale\)\)$", text, re.M):
        problems.append(f"the script's budget is not {CALL_LIMIT_S} s")
    return problems


def test_time_plan_fits_the_call_and_is_what_the_script_runs():
    text = SCRIPT.read_text()
    plan, total = time_plan(text)
    assert {"install", "ops_tests", "throughput", "ops", "prior"} <= set(plan)
    assert plan["install"][1].startswith("background")
    assert plan_problems(text) == []
    assert total < CALL_LIMIT_S


def test_a_plan_that_disagrees_with_the_script_is_caught():
    text = SCRIPT.read_text()
    assert any("ops: the script gives it 99 s" in p
               for p in plan_problems(re.sub(r"^run_step ops \d+", "run_step ops 99", text, flags=re.M)))
    longer = re.sub(r"^(#\s+plan\s+throughput\s+)\d+", r"\g<1>400", text, flags=re.M)
    assert any("not under 540" in p for p in plan_problems(longer))


def test_prepare_prints_the_first_contact_call_first_and_it_fits_the_run_tool():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "prepare_gpu_run.sh"), "--first-contact-only"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    call = re.search(r"run timeout_s=(\d+) command: (.+)$", result.stdout, re.M)
    timeout_s, command = int(call[1]), call[2]
    _, total = time_plan(SCRIPT.read_text())
    assert total < CALL_LIMIT_S < timeout_s <= 600  # the script stops itself first; the tool's limit is 600 s
    assert len(command) < 2000 and "bash benchmarks/gpu_first_contact.sh" in command
    assert re.search(r"RELA_COMMIT=[0-9a-f]{40}(-dirty)?\b", command)
    assert "dali" not in command.lower()


def _files(out: Path) -> list[Path]:
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the script targets the Linux GPU machine")
def test_tiny_rehearsal_on_the_cpu_leaves_what_a_device_call_brings_back(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "RELA_COMMIT": "0123abc-rehearsal",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(SCRIPT), "--tiny"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    report = json.loads((out / "first_contact.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert result.returncode == 0, result.stdout[-3000:] + json.dumps(
        {name: step.get("output_tail", "") for name, step in steps.items() if step["status"] != "pass"})

    files = _files(out)
    assert 0 < len(files) <= MAX_FILES, files
    for path in files:
        assert len(path.parts) - 1 <= MAX_FOLDERS and all(NAME.fullmatch(part) for part in path.parts), path
    assert {str(p) for p in files} == {"first_contact.json", "first_contact.log", "throughput-warmup.json",
                                       "throughput.json", "ops_cpu.json", "prior-cpu-quick.json"}
    for path in files:
        if path.suffix != ".json":
            continue
        payload = json.loads((out / path).read_text())
        environment = payload.get("environment", payload)  # the benchmarks nest it; the run's report does not
        assert {"device", "versions", "commit", "date"} <= set(environment), path
        assert {"torch", "triton", "cuda"} <= set(environment["versions"]), path
        assert environment["commit"] == "0123abc-rehearsal" and environment["device"].startswith("cpu"), path

    assert report["mode"] == "tiny" and list(steps) == [
        "versions", "throughput_warmup", "install", "ops_tests", "throughput", "ops", "prior"]
    assert steps["ops_tests"]["status"] == "skipped" and "needs CUDA" in steps["ops_tests"]["reason"]
    assert all(step["status"] == "pass" for name, step in steps.items() if name != "ops_tests"), steps
    assert report["plan_timeouts_s"] == {name: seconds for name, (seconds, _) in time_plan(SCRIPT.read_text())[0].items()}
    throughput = json.loads((out / "throughput.json").read_text())
    timed = {(r["step"], r["fused"]) for r in throughput["step"]["rows"] if r["images_per_s"] is not None}
    assert {("supervised", "-"), ("byol", "off"), ("rela", "off"), ("prior forward", "-")} <= timed
    assert all(check["train_steps"]["same"] and check["prior_forward"]["same"]
               for check in throughput["step"]["like_for_like"])
    log = (out / "first_contact.log").read_text()
    assert all(f"== {name}: " in log for name in steps if name != "ops_tests")
