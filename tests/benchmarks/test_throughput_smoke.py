"""benchmarks/throughput.py --quick end to end, so that the benchmark CI cannot let rot: the JSON's keys and
finite numbers, the tables on stdout, the PNG. It checks that numbers are reported, never how fast."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # --quick as CI runs it, shortened further: 4 epochs and a 20-epoch probe keep it near a minute.
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--device", "cpu",
                             "--epochs", "4", "--probe-epochs", "20", "--out", str(out)],
                            cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout, json.loads((out / "throughput.json").read_text())


@pytest.mark.slow
def test_json_carries_the_environment_and_every_part(quick_run):
    _, _, report = quick_run
    assert report["benchmark"] == "throughput" and report["quick"] is True
    for key in ("device", "versions", "commit", "date"):
        assert key in report["environment"]
    for part in ("step", "loader", "target_bank", "end_to_end", "projection"):
        assert part in report, part


@pytest.mark.slow
def test_step_rows_time_byol_rela_and_supervised_and_say_why_fused_is_skipped(quick_run):
    _, _, report = quick_run
    rows = report["step"]["rows"]
    timed = {(r["setup"], r["step"], r["fused"]) for r in rows if r["images_per_s"] is not None}
    setup = report["step"]["setups"][0]["label"]
    for step, fused in (("supervised", "-"), ("byol", "off"), ("rela", "off"), ("prior forward", "-")):
        assert (setup, step, fused) in timed, (step, fused)
    for r in rows:
        if r["images_per_s"] is not None:
            assert finite(r["images_per_s"]) and r["images_per_s"] > 0 and finite(r["median_ms"])
        else:  # on the CPU: fused on is reported as not timed, with the reason
            assert r["fused"] == "on" and "interpreter" in r["note"]
    ratios = report["step"]["ratios"]
    assert ratios and all(finite(r["rela_over_byol"]) and finite(r["byol_over_supervised"]) for r in ratios)


@pytest.mark.slow
def test_loader_bank_and_projection_are_finite(quick_run):
    _, _, report = quick_run
    loader = report["loader"]["rows"]
    assert {r["views"] for r in loader} == {"rela", "byol"}
    assert all(finite(r["images_per_s"]) and r["bottleneck"] in ("loader", "step") for r in loader)
    bank = report["target_bank"]
    assert finite(bank["seconds"]) and finite(bank["seconds_per_1000_images"]) and bank["images"] > 0
    projection = report["projection"]
    assert "PROJECTION" in projection["what"]
    assert [r["run"] for r in projection["rows"]] == ["byol-100%", "rela-20%"]
    assert all(finite(r["hours"]) and finite(r["ratio_to_byol"]) for r in projection["rows"])


@pytest.mark.slow
def test_end_to_end_reports_ratio_and_accuracy_delta_per_budget(quick_run):
    _, _, report = quick_run
    e2e = report["end_to_end"]
    assert list(e2e["budgets"]) == ["0.2"]
    budget = e2e["budgets"]["0.2"]
    assert finite(budget["wall_clock_ratio"]) and budget["wall_clock_ratio"] > 0
    assert finite(budget["accuracy_delta"]) and finite(budget["knn_delta"])
    assert len(budget["per_seed"]) == 1
    runs = e2e["runs"]
    assert {(r["method"], r["budget"]) for r in runs} == {("byol", 1.0), ("rela", 0.2)}
    for r in runs:
        for key in ("wall_clock_s", "images_seen", "linear_probe_top1", "knn_top1"):
            assert finite(r[key]), key
    rela = next(r for r in runs if r["method"] == "rela")
    assert rela["target_bank_s"] > 0  # a fresh bank folder: the build is counted, not a cached bank's load
    byol = next(r for r in runs if r["method"] == "byol")
    assert rela["images_seen"] < byol["images_seen"]


@pytest.mark.slow
def test_tables_on_stdout_and_a_png_beside_the_json(quick_run):
    out, stdout, _ = quick_run
    for heading in ("step throughput", "loader vs step", "target bank", "wall-clock saving", "PROJECTION"):
        assert heading in stdout, heading
    for column in ("images_per_s", "seconds_per_1000_images", "wall_clock_ratio", "accuracy_delta"):
        assert column in stdout, column
    png = out / "throughput.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000
