"""benchmarks/throughput.py --quick end to end, so that the benchmark CI cannot let rot: the JSON's keys and
finite numbers, the honest baselines (untrained backbone, BYOL at the reduced budget, a transfer prior), the
per-seed deltas and the time-to-accuracy keys, the tables on stdout, the PNG. It checks that numbers are
reported and consistent, never how fast or how accurate."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.throughput_projection import project_imagenet
from benchmarks.throughput_runs import (PlannedRun, group_label, median_time, paired_interval, plan_runs, run_name,
                                        time_to_target)
from benchmarks.throughput_steps import StepSetup
from rela.config import METHOD_NAMES

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = {("byol", 1.0), ("byol", 0.2), ("rela", 0.2), ("rela-transfer", 0.2), ("untrained", None)}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The transfer prior: a one-epoch digits run of this trainer (the benchmark reads its backbone.pt).
    prior_run = out / "prior-run"
    made = subprocess.run([sys.executable, "-m", "rela.train", "--device", "cpu", "--prior", "none", "--epochs", "1",
                           "--probe-epochs", "1", "--no-monitor", "--no-progress", "--out", str(prior_run),
                           "--bank-dir", str(out / "prior-bank")],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-4000:]
    # --quick as CI runs it, shortened further: 2 epochs, a 3-epoch probe, a small monitor; the ResNet-50
    # projection's step timing is skipped here (project_imagenet has its own test below).
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--device", "cpu",
                             "--dataset", "digits", "--epochs", "2", "--probe-epochs", "3", "--monitor-size", "200", "--skip", "projection",
                             "--transfer-prior", f"run:{prior_run}", "--out", str(out)],
                            cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout, json.loads((out / "throughput.json").read_text())


def test_paired_interval_is_the_t_interval_and_absent_for_one_seed():
    # deltas 1, 2, 3: mean 2, std 1, t(0.975, 2 df) = 4.3027
    low, high = paired_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.302653 / math.sqrt(3), rel=1e-5)
    assert high == pytest.approx(2 + 4.302653 / math.sqrt(3), rel=1e-5)
    assert paired_interval([0.5]) is None


def test_time_to_target_is_the_first_monitored_clock_at_or_above_it():
    curve = [[1.0, 50.0, 5], [2.0, 70.0, 10], [3.0, 65.0, 15], [4.0, 80.0, 20]]
    assert time_to_target(curve, 70.0) == 2.0
    assert time_to_target(curve, 81.0) is None
    assert median_time([1.0, 3.0, None]) == 3.0  # a seed that never reached it counts as slowest
    assert median_time([1.0, None, None]) is None


def test_plan_has_every_baseline_and_the_transfer_prior_only_when_given():
    plan = plan_runs("rand", [0.2, 0.5], None)
    assert [(p.method, p.prior, p.budget) for p in plan] == [
        ("byol", "none", 1.0), ("byol", "none", 0.2), ("byol", "none", 0.5), ("rela", "rand", 0.2),
        ("rela", "rand", 0.5), ("untrained", "none", None)]
    transfer = [p for p in plan_runs("rand", [0.2], "run:/x") if p.method == "rela-transfer"]
    assert [(p.prior, p.budget) for p in transfer] == [("run:/x", 0.2)]


def test_projection_rows_from_measured_step_rates():
    setup = StepSetup("p", "resnet50", 8, 112, "fp32", False, 4096, 256, "lars", 0.2, 1e-6, 0.996, 1000)
    rows = [{"setup": "p", "fused": f, "step": s, "images_per_s": v}
            for s, f, v in (("byol", "off", 100.0), ("rela", "off", 150.0), ("prior forward", "-", 1000.0))]
    projection = project_imagenet(rows, setup, "off", {0.2: 0.5}, epochs=100, gpus=8)
    assert "PROJECTION" in projection["what"]
    assert [r["run"] for r in projection["rows"]] == ["byol-100%", "rela-20%"]
    assert all(finite(r["hours"]) and finite(r["ratio_to_byol"]) for r in projection["rows"])
    assert 0 < projection["rows"][1]["ratio_to_byol"] < 1


@pytest.mark.slow
def test_json_carries_the_environment_and_every_part(quick_run):
    _, _, report = quick_run
    assert report["benchmark"] == "throughput" and report["quick"] is True
    for key in ("device", "versions", "commit", "date"):
        assert key in report["environment"]
    for part in ("step", "loader", "target_bank", "end_to_end"):
        assert part in report, part
    assert report["end_to_end"]["recipe"] == "project"


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
def test_every_method_has_a_step_row_against_its_rela_phase_step(quick_run):
    _, _, payload = quick_run
    rows = payload["step"]["methods"]
    assert [r["method"] for r in rows] == list(METHOD_NAMES)
    for r in rows:
        assert finite(r["method_images_per_s"]) and finite(r["rela_images_per_s"]) and r["method_images_per_s"] > 0
        assert r["rela_over_method"] == pytest.approx(r["rela_images_per_s"] / r["method_images_per_s"])


def test_labels_follow_the_ssl_method():
    assert group_label("byol", 1.0) == "BYOL 100%"
    assert group_label("byol", 1.0, "dino") == "DINO 100%"
    assert group_label("rela", 0.2, "simclr") == "RELA+SimCLR 20%"
    assert run_name(PlannedRun("byol", "none", 1.0), 0, "vicreg") == "vicreg-100%-seed0"


def test_loader_and_bank_are_finite(quick_run):
    _, _, report = quick_run
    loader = report["loader"]["rows"]
    assert {r["views"] for r in loader} == {"rela", "byol"}
    assert all(finite(r["images_per_s"]) and r["bottleneck"] in ("loader", "step") for r in loader)
    bank = report["target_bank"]
    assert finite(bank["seconds"]) and finite(bank["seconds_per_1000_images"]) and bank["images"] > 0
    assert finite(bank["in_runs_seconds_mean"])


@pytest.mark.slow
def test_every_baseline_has_a_run_per_seed_with_its_numbers(quick_run):
    _, _, report = quick_run
    e2e = report["end_to_end"]
    runs = {(r["method"], r["budget"]): r for r in e2e["runs"]}
    assert set(runs) == GROUPS and len(e2e["runs"]) == len(GROUPS)  # one seed
    for r in e2e["runs"]:
        for key in ("wall_clock_s", "training_clock_s", "images_seen", "linear_probe_top1", "knn_top1"):
            assert finite(r[key]), (r["run"], key)
        assert r["training_clock_s"] == pytest.approx(r["wall_clock_s"] - r["monitor_s"])
    untrained = runs[("untrained", None)]
    assert untrained["train_steps"] == 0 and untrained["images_seen"] == 0 and untrained["monitor"] == []
    assert untrained["wall_clock_s"] == untrained["eval_s"]
    byol, byol_reduced, rela = runs[("byol", 1.0)], runs[("byol", 0.2)], runs[("rela", 0.2)]
    assert byol_reduced["prior"] == "none" and byol_reduced["images_seen"] == rela["images_seen"] < byol["images_seen"]
    assert rela["target_bank_s"] > 0  # a fresh bank folder: the build is counted, not a cached bank's load
    assert runs[("rela-transfer", 0.2)]["prior"].startswith("run:")
    for key, r in runs.items():
        if key[0] == "untrained":
            continue
        assert r["rela_phase_ended_by"] is None if key[0] == "byol" else r["rela_phase_ended_by"]
        clocks = [point[0] for point in r["monitor"]]
        # the untrained network at step 0, then one per epoch, on a rising clock
        assert len(clocks) == 3 and clocks == sorted(clocks) and r["monitor"][0][2] == 0, r["run"]
        assert all(finite(point[1]) and 0 <= point[1] <= 100 for point in r["monitor"])
        assert clocks[-1] <= r["training_clock_s"]


@pytest.mark.slow
def test_summary_has_every_seed_and_deltas_paired_by_seed(quick_run):
    _, stdout, report = quick_run
    e2e = report["end_to_end"]
    summary = {(g["method"], g["budget"]): g for g in e2e["summary"]}
    runs = {(r["method"], r["budget"]): r for r in e2e["runs"]}
    assert set(summary) == GROUPS
    reference = runs[("byol", 1.0)]
    for key, group in summary.items():
        assert group["seeds"] == 1 and group["seed_ids"] == [0]
        assert group["linear_probe_top1_per_seed"] == [runs[key]["linear_probe_top1"]]
        assert group["linear_probe_top1_std"] == 0.0
        assert group["linear_delta_per_seed"] == [runs[key]["linear_probe_top1"] - reference["linear_probe_top1"]]
        assert group["knn_delta_per_seed"] == [runs[key]["knn_top1"] - reference["knn_top1"]]
        assert group["linear_delta_ci95"] is None and group["knn_delta_ci95"] is None  # one seed: n/a
        assert group["wall_clock_ratio"] == pytest.approx(runs[key]["wall_clock_s"] / reference["wall_clock_s"])
    assert summary[("byol", 1.0)]["linear_delta"] == 0.0 and summary[("byol", 1.0)]["wall_clock_ratio"] == 1.0
    assert "n/a (1 seed)" in stdout


@pytest.mark.slow
def test_time_to_target_is_read_off_the_monitor_curves(quick_run):
    _, _, report = quick_run
    e2e = report["end_to_end"]
    ttt = e2e["time_to_target"]
    reference = next(r for r in e2e["runs"] if (r["method"], r["budget"]) == ("byol", 1.0))
    assert ttt["target_drop_pp"] == 1.0
    assert ttt["target_knn_top1"] == pytest.approx(reference["monitor"][-1][1] - 1.0)
    for r in e2e["runs"]:
        expected = next((clock for clock, accuracy, _ in r["monitor"] if accuracy >= ttt["target_knn_top1"]), None)
        assert r["time_to_target_s"] == expected, r["run"]
    assert reference["time_to_target_s"] is not None  # its own final is above its final minus a point
    for group in e2e["summary"]:
        assert group["reached_target"] == sum(t is not None for t in group["time_to_target_s_per_seed"])
        if group["method"] != "untrained":
            assert group["time_to_target_s"] == group["time_to_target_s_per_seed"][0]
    byol = next(g for g in e2e["summary"] if (g["method"], g["budget"]) == ("byol", 1.0))
    assert byol["time_to_target_ratio"] == 1.0


@pytest.mark.slow
def test_headline_says_met_or_not_met_and_names_the_baselines(quick_run):
    _, stdout, report = quick_run
    lines = report["end_to_end"]["headline"]
    for claim in ("claim (linear probe)", "claim (kNN)", "claim (time-to-target)"):
        line = next(line for line in lines if line.startswith(claim))
        assert " MET" in line and "20%" in line and line in stdout  # " MET" also in "NOT MET"
    assert any(line.startswith("baseline BYOL 20%") for line in lines)
    assert any(line.startswith("baseline untrained backbone") for line in lines)
    assert any(line.startswith("RELA transfer 20%") for line in lines)


@pytest.mark.slow
def test_tables_on_stdout_and_a_png_beside_the_json(quick_run):
    out, stdout, _ = quick_run
    for heading in ("step throughput", "loader vs step", "target bank", "wall-clock saving against honest baselines"):
        assert heading in stdout, heading
    for column in ("images_per_s", "seconds_per_1000_images", "wall_clock_ratio", "linear_delta [95% CI]",
                   "time_to_target_s", "untrained-seed0", "byol-20%-seed0", "rela-transfer-20%-seed0"):
        assert column in stdout, column
    png = out / "throughput.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000
