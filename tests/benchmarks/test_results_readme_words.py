"""The generated results section's words: held-out seeds are named as such, and a variant that reaches the 100%
run on both metrics is listed once."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.results_readme import RESULTS, plain_lines, seeds_text  # noqa: E402


def test_seeds_text_names_held_out_seeds():
    assert seeds_text([0, 1, 2], {"seeds": 3}) == "3 seeds"
    assert seeds_text([0, 1, 2], {"first_seed": 0}) == "3 seeds"
    assert seeds_text([3, 4, 5], {"first_seed": 3}) == "seeds 3-5, held out"


def _result_with(tmp_path: Path, name: str, edit) -> Path:
    result = json.loads((RESULTS / "handover-cpu-mnist5k-byol-reference.json").read_text())
    result = copy.deepcopy(result)
    edit(result)
    path = tmp_path / name
    path.write_text(json.dumps(result))
    return path


def test_plain_line_lists_a_reaching_variant_once_with_its_metrics(tmp_path):
    path = _result_with(tmp_path, "a.json", lambda r: None)
    line = plain_lines([path])[0]
    # the reference recipe's BYOL runs reach BYOL at 100% on both metrics (the committed JSON)
    assert "with hard hand-over (the reference's) (linear and kNN)" in line
    assert line.count("hard hand-over (the reference's)") == 1


def test_plain_line_says_held_out(tmp_path):
    def held_out(result):
        result["args"]["first_seed"] = 3
        for run in result["runs"]:
            run["seed"] += 3
    line = plain_lines([_result_with(tmp_path, "b.json", held_out)])[0]
    assert "seeds 3-5, held out" in line


def test_monitor_agreement_ranks_ties_by_their_mean_rank():
    from benchmarks.results_readme import monitor_agreement_text
    runs = [{"run": f"r{i}", "monitor": [[1.0, m, 50]], "knn_top1": f} for i, (m, f) in
            enumerate([(60.0, 70.0), (60.0, 80.0), (70.0, 75.0), (75.0, 90.0)])]
    # ranks (1.5, 1.5, 3, 4) against (1, 3, 2, 4): rho = 3 / sqrt(4.5 * 5)
    assert "Spearman's rho 0.63" in monitor_agreement_text({"runs": runs})
    flat = [{**r, "monitor": [[1.0, 60.0, 50]]} for r in runs]
    assert monitor_agreement_text({"runs": flat}) == ""  # a constant monitor has no rank correlation


def test_monitor_agreement_reports_the_gap_and_the_rank_correlation():
    from benchmarks.results_readme import monitor_agreement_text
    runs = [{"run": f"r{i}", "monitor": [[1.0, m, 50]], "knn_top1": f} for i, (m, f) in
            enumerate([(60.0, 70.0), (65.0, 80.0), (70.0, 75.0), (75.0, 90.0)])]
    text = monitor_agreement_text({"runs": runs + [{"run": "untrained", "monitor": [], "knn_top1": 10.0}]})
    assert "4 trained runs" in text and "+11.2 points" in text and "(+5.0 to +15.0)" in text
    assert "Spearman's rho 0.80" in text  # ranks (1, 2, 3, 4) against (1, 3, 2, 4)
