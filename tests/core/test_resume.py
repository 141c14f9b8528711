"""A run stopped part-way and resumed ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from builders import FAST_ARGS, assert_same_backbones, training_rows
from rela.config import config_to_dict
from rela.errors import RelaError
from rela.options import parse_config
from rela.train import main
from rela.checkpoint import check_resumable
from rela.utils.checkpoint_files import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]


def backbone_of(run_dir: Path) -> dict:
    return torch.load(run_dir / "backbone.pt")["state_dict"]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

# 3 epochs of 8 steps (143 images in whole batches of 16); the RELA phase ends at step 12, mid-epoch, after the
# interruption at step 11.
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

    assert_same_backbones(tmp_path / "whole", tmp_path / "split")
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "split" / "summary.json").read_text())
    for key in ("train_steps", "images_seen", "rela_phase_end_step", "linear_probe_top1", "knn_top1"):
        assert a[key] == b[key], key
    assert a["rela_phase_end_step"] == 12


def test_checkpoints_are_complete_files(tmp_path):
    """Every checkpoint left on disk loads (written to a temp name, then renamed); old ones are pruned."""
    assert main([*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(tmp_path / "run")]) == 0
    files = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in files] == ["ckpt-000000020.pt", "ckpt-000000024.pt"]
    backbone = backbone_of(tmp_path / "run")
    for f in files:
        state = torch.load(f, weights_only=False)
        assert {"learner", "optimizer", "controller", "loader", "train_state"} <= set(state)
        # Each entry whole, not only named: every backbone weight and buffer in the learner (at its shape),
        # an optimiser state for every parameter it steps, the controller's fields, each rank's loader, the
        # step the file is named after.
        learner = state["learner"]
        for name, value in backbone.items():
            assert learner[f"method.backbone.{name}"].shape == value.shape, name
        stepped = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
        assert stepped > 0 and len(state["optimizer"]["state"]) == stepped
        assert all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in state["optimizer"]["state"].values())
        assert {"fast", "slow", "rho", "done", "plateau_step", "flags", "updates"} <= set(state["controller"])
        assert len(state["loader"]) == 1 and state["loader"][0]
        assert state["train_state"]["step"] == int(f.stem.split("-")[1])


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
    assert latest_checkpoint(tmp_path / "split").name == "ckpt-000000007.pt"  # it stopped where asked
    assert not (tmp_path / "split" / "summary.json").exists()
    assert max(r["step"] for r in metric_rows(tmp_path / "split")) <= 7
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")
    steps = [r["step"] for r in training_rows(tmp_path / "split")]
    assert steps == sorted(set(steps)), "a resumed run must not leave duplicate metric rows"


@pytest.mark.slow
def test_sigkill_between_a_log_row_and_the_next_checkpoint_loses_nothing(tmp_path):
    """Killed after step 6's row is logged and before any checkpoint past step 4: the resumed run logs
    steps 5 and 6 again, once, and ends with the uninterrupted run's weights."""
    banks = ["--bank-dir", str(tmp_path / "banks")]
    assert main([*ARGS, *banks, "--out", str(tmp_path / "whole")]) == 0
    # This process's thread settings (no OMP_NUM_THREADS of its own): the whole run ran here, and float sums
    # depend on the thread count.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RELA_KILL_AT": "after-step:6"}
    split = tmp_path / "split"
    killed = subprocess.run([sys.executable, "-m", "rela.train", *ARGS, *banks, "--out", str(split)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(r["step"] for r in metric_rows(split)) == 6
    assert latest_checkpoint(split).name == "ckpt-000000004.pt"
    assert main([*ARGS, *banks, "--out", str(split), "--resume", "auto"]) == 0
    assert_same_backbones(tmp_path / "whole", split)
    assert [r["step"] for r in metric_rows(split)] == [r["step"] for r in metric_rows(tmp_path / "whole")]


def test_resume_after_the_hand_over_keeps_byol_and_its_views(tmp_path):
    banks = ["--bank-dir", str(tmp_path / "banks")]
    args = [*ARGS, *banks, "--log-every", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after-steps", "17"]) == 0  # hand-over at 14
    saved = torch.load(latest_checkpoint(tmp_path / "split"), weights_only=False)
    assert saved["train_state"]["phase"] == "byol" and saved["loader"][0]["view_mode"] == "byol"
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")
    after = [r for r in training_rows(tmp_path / "split") if r["step"] > 17]
    assert after and all((r["step_fn"], r["views"]) == ("byol_step", "byol") for r in after)


def test_resume_in_adaptive_mode_hands_over_where_the_whole_run_did(tmp_path):
    banks = ["--bank-dir", str(tmp_path / "banks")]
    args = [*FAST_ARGS, "--epochs", "3", "--budget", "0.1", "--prior", "rand", "--deterministic",
            "--ckpt-every", "4", "--log-every", "3", "--rela-threshold", "0.42", *banks]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["rela_phase_ended_by"] == "plateau"
    stop = whole["rela_phase_end_step"] - 2  # before the hand-over: the controller's state must carry it
    assert stop >= 1
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after-steps", str(stop)]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    split = json.loads((tmp_path / "split" / "summary.json").read_text())
    for key in ("rela_phase_end_step", "rela_phase_ended_by", "rela_plateau_step", "train_steps"):
        assert split[key] == whole[key], key
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")


@pytest.mark.slow
def test_resume_under_torchrun_gives_the_uninterrupted_replicas(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rela.train",
            *ARGS, "--device", "cpu", "--batch-size", "16", "--bank-dir", str(tmp_path / "banks")]

    def torchrun(*args: str) -> None:
        result = subprocess.run([*base, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    torchrun("--out", str(tmp_path / "whole"))
    torchrun("--out", str(tmp_path / "split"), "--stop-after-steps", "5")
    assert latest_checkpoint(tmp_path / "split").name == "ckpt-000000005.pt"
    torchrun("--out", str(tmp_path / "split"), "--resume", "auto")
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    split = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert whole["world_size"] == split["world_size"] == 2
    assert split["replica_weight_digests"] == whole["replica_weight_digests"]
    assert split["images_seen"] == whole["images_seen"]


def test_ckpt_minutes_replaces_epoch_end_checkpoints_by_time(tmp_path):
    """With --ckpt-minutes, epoch ends no longer checkpoint: a long interval leaves none (--ckpt-every is
    out of reach), a tiny one checkpoints at the logging steps."""
    banks = ["--bank-dir", str(tmp_path / "banks")]
    args = [*FAST_ARGS, "--epochs", "2", "--budget", "0.1", "--prior", "none", "--ckpt-every", "1000", *banks]
    assert main([*args, "--out", str(tmp_path / "by-epoch")]) == 0
    assert latest_checkpoint(tmp_path / "by-epoch").name == "ckpt-000000016.pt"  # the last epoch end
    assert main([*args, "--ckpt-minutes", "600", "--out", str(tmp_path / "long")]) == 0
    assert latest_checkpoint(tmp_path / "long") is None
    assert main([*args, "--ckpt-minutes", "1e-6", "--log-every", "4", "--out", str(tmp_path / "short")]) == 0
    assert [p.name for p in sorted((tmp_path / "short" / "checkpoints").iterdir())] == [
        "ckpt-000000012.pt", "ckpt-000000016.pt"]


def test_a_checkpoint_older_than_an_option_resumes_under_that_options_default():
    """A checkpoint written before an option existed ran with what is now its default: resuming it is not
    refused as a change; a real change still is."""
    cfg = parse_config(["--dataset", "cifar10", "--method", "dino"])  # cifar10: the paper's head, the options' defaults
    older = {k: v for k, v in config_to_dict(cfg).items() if k not in ("dino_head_layers", "dino_head_bn")}
    run = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=1))
    check_resumable({"config": older, "world_size": 1}, run, Path("ckpt.pt"))
    run.cfg = parse_config(["--dataset", "cifar10", "--method", "dino", "--dino-head-layers", "2"])
    with pytest.raises(RelaError, match="--dino-head-layers 3 -> 2"):
        check_resumable({"config": older, "world_size": 1}, run, Path("ckpt.pt"))


def test_a_checkpoint_that_saved_sync_bn_false_resumes_under_the_recipe_chosen_default():
    """Before --sync-bn's default became None (the recipe decides), checkpoints saved False: the same training."""
    cfg = parse_config(["--dataset", "digits"])
    assert cfg.sync_bn is None
    older = {**config_to_dict(cfg), "sync_bn": False}
    run = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=1))
    check_resumable({"config": older, "world_size": 1}, run, Path("ckpt.pt"))
    run.cfg = parse_config(["--dataset", "digits", "--sync-bn"])
    with pytest.raises(RelaError, match="--sync-bn False -> True"):
        check_resumable({"config": older, "world_size": 1}, run, Path("ckpt.pt"))
