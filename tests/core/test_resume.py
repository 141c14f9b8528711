"""A run stopped part-way and resumed ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import json

import torch

from builders import FAST_ARGS
from rela.train import main
from rela.utils.checkpoint import latest_checkpoint

# 3 epochs of 9 steps; the RELA phase ends at step 14, mid-epoch, after the interruption at step 11.
ARGS = [*FAST_ARGS, "--epochs", "3", "--budget", "0.1", "--prior", "rand", "--rela-phase", "0.5",
        "--deterministic", "--ckpt-every", "4", "--log-every", "3"]


def test_resume_gives_same_weights(tmp_path):
    banks = ["--bank-dir", str(tmp_path / "banks")]
    assert main([*ARGS, *banks, "--out", str(tmp_path / "whole")]) == 0
    assert main([*ARGS, *banks, "--out", str(tmp_path / "split"), "--stop-after-steps", "11"]) == 0
    assert not (tmp_path / "split" / "summary.json").exists()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert checkpoint is not None and checkpoint.name == "ckpt-000000011.pt"
    assert main([*ARGS, *banks, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0

    whole = torch.load(tmp_path / "whole" / "backbone.pt")["state_dict"]
    split = torch.load(tmp_path / "split" / "backbone.pt")["state_dict"]
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "split" / "summary.json").read_text())
    for key in ("train_steps", "images_seen", "rela_phase_end_step", "linear_probe_top1", "knn_top1"):
        assert a[key] == b[key], key
    assert a["rela_phase_end_step"] == 14


def test_checkpoints_are_complete_files(tmp_path):
    """Every checkpoint left on disk loads (written to a temp name, then renamed); old ones are pruned."""
    assert main([*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(tmp_path / "run")]) == 0
    files = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in files] == ["ckpt-000000024.pt", "ckpt-000000027.pt"]
    for f in files:
        state = torch.load(f, weights_only=False)
        assert {"learner", "optimizer", "controller", "loader", "train_state"} <= set(state)


def test_resume_refuses_other_settings_and_fresh_runs_refuse_used_folders(tmp_path, capsys):
    banks = ["--bank-dir", str(tmp_path / "banks")]
    out = ["--out", str(tmp_path / "run")]
    assert main([*ARGS, *banks, *out, "--stop-after-steps", "5"]) == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    before = checkpoint.read_bytes()
    assert main([*ARGS, *banks, *out, "--resume", "auto", "--lr", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--lr 0.002 -> 0.5" in err
    assert main([*ARGS, *banks, *out]) == 1  # a fresh run would prune and mix with the old one
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


def test_resume_with_gradient_accumulation_gives_same_weights(tmp_path):
    args = [*ARGS, "--grad-accum", "2", "--batch-size", "32", "--bank-dir", str(tmp_path / "banks")]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after-steps", "7"]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    whole = torch.load(tmp_path / "whole" / "backbone.pt")["state_dict"]
    split = torch.load(tmp_path / "split" / "backbone.pt")["state_dict"]
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    rows = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "a resumed run must not leave duplicate metric rows"
