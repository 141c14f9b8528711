"""benchmarks/handover.py end to end at toy size: every planned run per seed, the paired deltas, the verdicts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.handover import main, verdicts  # noqa: E402


@pytest.mark.slow
def test_toy_comparison_pairs_every_variant_with_the_method_runs(tmp_path):
    assert main(["--dataset", "digits", "--arch", "small_resnet", "--image-size", "16", "--batch-size", "32",
                 "--epochs", "2", "--probe-epochs", "3", "--seeds", "2", "--variants", "hard", "linear",
                 "--out", str(tmp_path), "--name", "toy"]) == 0
    result = json.loads((tmp_path / "toy.json").read_text())
    assert {"device", "versions", "commit", "date"} <= result["environment"].keys()
    kinds = [r["run"] for r in result["runs"]]
    assert kinds == ["method-100%", "method-budget", "rela-hard", "rela-linear", "untrained"] * 2
    assert [r["seed"] for r in result["runs"]] == [0] * 5 + [1] * 5
    summary = {row["run"]: row for row in result["summary"]}
    linear = summary["rela-linear"]
    per_seed = {(r["run"], r["seed"]): r for r in result["runs"]}
    deltas = [per_seed[("rela-linear", s)]["knn_top1"] - per_seed[("method-100%", s)]["knn_top1"] for s in (0, 1)]
    assert linear["knn_delta_vs_method-100%"] == pytest.approx(sum(deltas) / 2)
    assert linear["knn_delta_vs_method-100%_ci95"][0] <= linear["knn_delta_vs_method-100%"]
    assert len(result["verdicts"]) == 4  # two variants x (linear, kNN)


def test_a_verdict_says_reaches_only_where_the_whole_interval_does():
    def row(low, high):
        return {"run": "rela-x", "linear_delta_vs_method-100%": (low + high) / 2,
                "linear_delta_vs_method-100%_ci95": [low, high], "knn_delta_vs_method-100%": 0.0,
                "knn_delta_vs_method-100%_ci95": None}
    assert "reaches" in verdicts([row(-0.5, 2.0)], 1.0)[0] and "not" not in verdicts([row(-0.5, 2.0)], 1.0)[0]
    assert "undecided" in verdicts([row(-3.0, 2.0)], 1.0)[0]
    assert "does not reach" in verdicts([row(-5.0, -2.0)], 1.0)[0]
    assert "undecided (1 seed)" in verdicts([row(-5.0, -2.0)], 1.0)[1]
