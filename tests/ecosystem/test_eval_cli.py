"""python -m rela.eval: a finished run's backbone evaluated again (summary.json's numbers), on another dataset
(transfer), with both probe protocols, from backbone.safetensors; console scripts in pyproject."""
from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import pytest

from rela.eval.standalone import main

REPO = Path(__file__).resolve().parents[2]


def test_eval_on_the_runs_own_dataset_gives_its_summary_again(finished_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main([str(finished_run), "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    (result,) = report["results"].values()
    assert report["dataset"] == report["trained_on"] == "digits" and not report["transfer"]
    assert result["probe_protocol"] == summary["probe_protocol"] == "project"
    # the same features (split, size, normalisation) and the same seeded probe: the same numbers
    assert result["linear_probe_top1"] == pytest.approx(summary["linear_probe_top1"], abs=1e-9)
    assert result["knn_top1"] == pytest.approx(summary["knn_top1"], abs=1e-9)
    assert f"knn_top1={summary['knn_top1']:.2f}" in capsys.readouterr().out


def test_transfer_to_another_dataset_with_both_protocols(finished_run, tmp_path):
    """Trained on digits, evaluated on mnist5k (real 28x28 digits) at the run's 16 px, from the file users
    without rela get (backbone.safetensors says its arch and size)."""
    out = tmp_path / "transfer.json"
    assert main([str(finished_run / "backbone.safetensors"), "--dataset", "mnist5k", "--probe-protocol", "both",
                 "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["trained_on"] == "digits" and report["dataset"] == "mnist5k" and report["transfer"]
    assert report["image_size"] == 16 and report["train_images"] + report["val_images"] == 5000
    project, reference = report["results"]["project"], report["results"]["reference"]
    assert reference["linear_probe_top1_std"] is not None and project["linear_probe_top1_std"] is None
    assert project["knn_top1"] == reference["knn_top1"]  # one set of features for both
    for r in (project, reference):
        # Chance is 10%; 15% is five standard deviations above it on 1,000 validation images. (The shared run is
        # 17 steps since the short last batch is dropped, and its transfer sits near 25%.)
        assert 15 < r["linear_probe_top1"] <= 100 and 15 < r["knn_top1"] <= 100


def test_eval_input_errors_are_one_line(finished_run, tmp_path, capsys):
    import torch

    cases = [
        ([str(tmp_path)], "holds no backbone.pt"),
        ([str(finished_run / "backbone.pt"), "--arch", "resnet18"], "does not fit --arch resnet18"),
    ]
    loose = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, loose)
    cases.append(([str(loose), "--dataset", "digits"], "does not say its architecture: pass --arch"))
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("rela.eval: error:") and message in err and "\n" not in err, err


def test_console_scripts_point_at_the_entry_points():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"rela-train", "rela-eval"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
