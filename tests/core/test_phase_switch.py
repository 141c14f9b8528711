"""The hand-over from RELA to BYOL changes what really runs, at exactly the step it is reported at: the
learner's step function and the loader's views, as each step recorded them (not the phase label), under the
default linear hand-over (its blended steps) and the reference's hard one."""
from __future__ import annotations

import json

import pytest

from builders import FAST_ARGS, expected_step_fn, training_rows
from rela.train import main


@pytest.mark.parametrize("loader, handover", [("torch", "linear"), ("dali", "linear"), ("torch", "hard")])
def test_step_function_and_views_switch_at_the_hand_over_step(tmp_path, loader, handover):
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--device", "cpu", "--loader", loader, "--prior", "rand", "--budget", "0.2",
                 "--epochs", "2", "--rela-phase", "0.4", "--log-every", "1", "--out", str(out),
                 "--bank-dir", str(tmp_path / "banks"), "--handover", handover]) == 0
    summary = json.loads((out / "summary.json").read_text())
    end = summary["rela_phase_end_step"]
    assert summary["rela_phase_ended_by"] == "fraction"
    assert end == round(0.4 * summary["train_steps"])
    rows = training_rows(out)
    assert [r["step"] for r in rows] == list(range(1, summary["train_steps"] + 1))  # one row per step
    for row in rows:
        expected = (expected_step_fn(row["step"], end, summary["train_steps"], handover=handover),
                    "rela" if row["step"] <= end else "byol")
        assert (row["step_fn"], row["views"]) == expected, row["step"]
    assert any(r["step_fn"].startswith("blend_") for r in rows) == (handover == "linear")
