"""The hand-over from RELA to BYOL changes what really runs, at exactly the step it is reported at: the
learner's step function and the loader's views, as each step recorded them (not the phase label)."""
from __future__ import annotations

import json

import pytest

from builders import FAST_ARGS, training_rows
from rela.train import main


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_step_function_and_views_switch_at_the_hand_over_step(tmp_path, loader):
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--device", "cpu", "--loader", loader, "--prior", "rand", "--budget", "0.2",
                 "--epochs", "2", "--rela-phase", "0.4", "--log-every", "1", "--out", str(out),
                 "--bank-dir", str(tmp_path / "banks")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    end = summary["rela_phase_end_step"]
    assert summary["rela_phase_ended_by"] == "fraction"
    assert end == round(0.4 * summary["train_steps"])
    rows = training_rows(out)
    assert [r["step"] for r in rows] == list(range(1, summary["train_steps"] + 1))  # one row per step
    for row in rows:
        expected = ("rela_step", "rela") if row["step"] <= end else ("byol_step", "byol")
        assert (row["step_fn"], row["views"]) == expected, row["step"]
