"""The command line end to end: the default job, each dataset kind, each prior kind, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import FAST_ARGS, expected_step_fn, training_rows, write_imagefolder
from rela.options import parse_config
from rela.train import evaluate_untrained, main

REPO = Path(__file__).resolve().parents[2]


def run_cli(args, tmp_path, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rela.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, **kwargs)


def train(tmp_path: Path, *args: str, name: str = "run") -> dict:
    out = tmp_path / name
    code = main([*FAST_ARGS, "--out", str(out), "--bank-dir", str(tmp_path / "banks"), *args])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_default_command_shows_the_whole_method_and_learns_beyond_initialisation(tmp_path):
    """`python -m rela.train` with no arguments: mnist5k (real digits), RELA with the student's own initial
    network as the prior at a 20% budget, the adaptive rule handing over to BYOL. (Its time, under 3 minutes on
    an idle 2-core CPU, is the README's claim and a benchmark's business: a loaded machine must not fail it.)"""
    result = run_cli([], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # runs/mnist5k-DATE-TIME
    assert run_dir.name.startswith("mnist5k-")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "mnist5k" and config["prior"] == "rand" and summary["budget"] == 0.2
    assert 0 < summary["target_bank_s"] < summary["wall_clock_s"]
    assert "linear_probe_top1=" in result.stdout
    # The whole method: a RELA phase that the adaptive rule ended, then BYOL, each step as recorded.
    assert summary["rela_phase_ended_by"] == "plateau"
    end, steps = summary["rela_phase_end_step"], summary["train_steps"]
    assert 0 < end < steps and end == summary["rela_plateau_step"] + 1
    rows = training_rows(run_dir)
    assert {"loss", "phase", "rho", "lr", "momentum", "images_per_s", "data_wait_fraction"} <= set(rows[0])
    assert [r["step_fn"] for r in rows] == [expected_step_fn(r["step"], end, steps) for r in rows]
    assert "blend_byol_step" in [r["step_fn"] for r in rows]  # the default linear hand-over
    # Time-to-accuracy: the kNN monitor from step 0 (the untrained network) to the end, with the clock.
    monitor = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "monitor_knn" in l]
    assert monitor[0]["step"] == 0 and monitor[-1]["step"] == steps
    assert all(a["training_clock_s"] < b["training_clock_s"] for a, b in zip(monitor, monitor[1:]))
    # Learning beyond the same backbone at its initialisation, same seed, same evaluation.
    untrained = evaluate_untrained(parse_config([]))
    assert summary["linear_probe_top1"] >= untrained["linear_probe_top1"] + 1.5, (summary, untrained)
    assert summary["knn_top1"] >= untrained["knn_top1"] + 4.0, (summary, untrained)


def test_help_documents_every_option(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    from rela.config import Config
    import dataclasses
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in result.stdout


def test_budget_counts_images_and_steps(tmp_path):
    summary = train(tmp_path, "--prior", "none", "--budget", "0.5", "--epochs", "2")
    per_epoch = int(1438 * 0.5)  # 719: 44 whole batches of 16, the short 45th dropped
    assert summary["images_seen"] == 2 * (per_epoch - per_epoch % 16)
    assert summary["train_steps"] == 2 * (per_epoch // 16)
    assert summary["rela_phase_end_step"] is None


def test_rela_then_byol_switches_at_the_fraction(tmp_path):
    summary = train(tmp_path, "--prior", "rand", "--budget", "0.5", "--epochs", "2", "--rela-phase", "0.5")
    assert summary["rela_phase_end_step"] == round(0.5 * summary["train_steps"])
    phases = [json.loads(l)["phase"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert phases[0] == "rela" and phases[-1] == "byol"


def test_adaptive_rule_hands_over_one_step_after_the_plateau(tmp_path):
    """The default threshold (0.995) with averages 10x shorter than the reference's: the rule fires within
    the run, and the hand-over comes one step after the step whose rho crossed (the host reads the flag a
    step late so that no step waits for the device)."""
    summary = train(tmp_path, "--prior", "rand", "--budget", "0.5", "--epochs", "3", "--rela-averaging-scale", "10",
                    "--log-every", "1")
    assert summary["rela_phase_ended_by"] == "plateau"
    end = summary["rela_phase_end_step"]
    assert 0 < end < summary["train_steps"]
    assert end == summary["rela_plateau_step"] + 1
    rows = training_rows(tmp_path / "run")
    assert [r["step_fn"] for r in rows] == [expected_step_fn(r["step"], end, summary["train_steps"]) for r in rows]


def test_rela_phase_lasting_the_whole_run_is_reported(tmp_path):
    summary = train(tmp_path, "--prior", "rand", "--budget", "0.2", "--epochs", "1")
    assert summary["rela_phase_ended_by"] == "end of training"
    assert summary["rela_phase_end_step"] == summary["train_steps"]


def test_target_bank_is_reused_and_rebuilt_when_the_key_changes(tmp_path, capsys):
    first = train(tmp_path, "--prior", "rand", "--budget", "0.2", name="a")
    second = train(tmp_path, "--prior", "rand", "--budget", "0.2", name="b")
    assert "reusing" in capsys.readouterr().err
    assert second["target_bank_s"] < first["target_bank_s"]
    train(tmp_path, "--prior", "rand", "--prior-seed", "99", "--budget", "0.2", name="c")
    err = capsys.readouterr().err
    assert "rebuilding" in err and "prior" in err


def test_imagefolder_and_cifar_fixtures_train(tmp_path, cifar10):
    folder = write_imagefolder(tmp_path / "tree", classes=3, per_class=10)
    s1 = train(tmp_path, "--dataset", "imagefolder", "--data", str(folder), "--prior", "rand", name="if")
    assert s1["train_steps"] >= 1
    s2 = train(tmp_path, "--dataset", "cifar10", "--data", str(cifar10), "--prior", "none", "--budget", "0.5",
               name="cifar-run")
    assert s2["images_seen"] == int(200 * 0.5) // 16 * 16 or s2["images_seen"] == int(200 * 0.5)


@pytest.mark.slow
def test_priors_from_files_and_runs(tmp_path):
    # torchvision architecture with a weights file
    import torchvision
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    s = train(tmp_path, "--prior", f"torchvision:resnet18:{weights}", "--prior-size", "32", name="tv")
    assert s["target_bank_s"] > 0
    # TorchScript with encode_image (as CLIP's files have)
    class Clipish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 2)

        def forward(self, x):
            return x

        @torch.jit.export
        def encode_image(self, x):
            return self.conv(x).mean((2, 3))

    script = tmp_path / "clipish.pt"
    torch.jit.save(torch.jit.script(Clipish()), str(script))
    train(tmp_path, "--prior", f"torchscript:{script}", "--prior-size", "24", name="ts")
    # a backbone trained by this trainer
    train(tmp_path, "--prior", f"run:{tmp_path / 'tv'}", name="from-run")


# --- bad input: one clear message, non-zero exit, nothing damaged -----------------------------------

@pytest.mark.parametrize("args,message", [
    (["--arch", "vgg99"], "unknown architecture 'vgg99'"),
    (["--budget", "0"], "--budget must be a finite number in (0, 1]"),
    (["--budget", "1.5"], "--budget must be a finite number in (0, 1]"),
    (["--dataset", "imagefolder", "--data", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--dataset", "cifar10"], "needs --data"),
    (["--prior", "torchscript:/nonexistent.pt"], "file /nonexistent.pt does not exist"),
    (["--prior", "magic"], "unknown --prior 'magic'"),
    (["--prior", "torchvision:notanet"], "torchvision has no model 'notanet'"),
    (["--rela-phase", "sometimes"], "--rela-phase must be 'adaptive' or a fraction"),
    (["--val-fraction", "0"], "--val-fraction must be a finite number in (0, 1)"),
    (["--knn-temperature", "0"], "--knn-temperature must be a finite number > 0"),
    (["--sync-bn"], "--sync-bn needs CUDA devices"),
])
def test_bad_options_give_one_clear_message(tmp_path, capsys, args, message):
    code = main([*FAST_ARGS, "--out", str(tmp_path / "run"), "--bank-dir", str(tmp_path / "b"), *args])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args,message", [(["--bugdet", "0.2"], "unrecognized arguments: --bugdet"),
                                          (["--dataset", "imagenet21k"], "invalid choice: 'imagenet21k'")])
def test_unknown_option_or_choice_exits_non_zero(tmp_path, args, message):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_imagefolder_with_train_but_no_val_holds_out_from_train(tmp_path):
    write_imagefolder(tmp_path / "tree" / "train", classes=3, per_class=10)
    from rela.data.datasets import load_dataset
    splits = load_dataset("imagefolder", str(tmp_path / "tree"), val_fraction=0.2)
    assert splits.num_classes == 3
    assert len(splits.train) == 24 and len(splits.val) == 6
    only_val = tmp_path / "other"
    write_imagefolder(only_val / "val", classes=2, per_class=2)
    from rela.errors import RelaError
    with pytest.raises(RelaError, match="has val/ but no train/"):
        load_dataset("imagefolder", str(only_val))


def test_empty_folder_and_unloadable_prior_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*FAST_ARGS, "--dataset", "imagefolder", "--data", str(empty), "--out", str(tmp_path / "r")]) == 1
    assert f"data folder {empty} is empty" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torchscript file")
    assert main([*FAST_ARGS, "--prior", f"torchscript:{garbage}", "--out", str(tmp_path / "r")]) == 1
    assert f"cannot load {garbage}" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    assert main([*FAST_ARGS, "--prior", f"torchvision:resnet18:{wrong}", "--out", str(tmp_path / "r")]) == 1
    assert f"{wrong} does not fit resnet18" in capsys.readouterr().err


def test_corrupt_image_is_named_or_skipped(tmp_path, capsys):
    folder = write_imagefolder(tmp_path / "tree", classes=2, per_class=12)
    bad = folder / "class_1" / "img_003.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # a truncated JPEG
    args = [*FAST_ARGS, "--dataset", "imagefolder", "--data", str(folder), "--val-fraction", "0.1"]
    code = main([*args, "--prior", "none", "--budget", "1.0", "--out", str(tmp_path / "r1")])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "img_003.jpg" in err and "--skip-corrupt" in err
    code = main([*args, "--prior", "rand", "--skip-corrupt", "--budget", "1.0", "--out", str(tmp_path / "r2"),
                 "--bank-dir", str(tmp_path / "b")])
    assert code == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["skipped_corrupt"] == 1


def test_mismatched_target_bank_is_rejected_and_left_intact(tmp_path, capsys):
    train(tmp_path, "--prior", "rand", name="a")
    bank = next((tmp_path / "banks").glob("bank-*.pt"))
    before = bank.read_bytes()
    code = main([*FAST_ARGS, "--prior", "rand", "--prior-seed", "7", "--target-bank", str(bank),
                 "--out", str(tmp_path / "b")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"target bank {bank} was built for another setting" in err and "prior" in err
    code = main([*FAST_ARGS, "--prior", "rand", "--arch", "resnet18_cifar", "--target-bank", str(bank),
                 "--out", str(tmp_path / "c")])
    assert code == 1
    assert "target bank" in capsys.readouterr().err
    assert bank.read_bytes() == before
