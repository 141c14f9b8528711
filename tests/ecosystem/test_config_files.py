"""--config FILE (YAML or JSON) under the flags, a run's config.json repeating it, --print-config's sources."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rela.config import Config
from rela.errors import RelaError
from rela.options import parse_config
from rela.train import main

REPO = Path(__file__).resolve().parents[2]


def test_a_runs_config_json_gives_the_same_config_back(finished_run):
    saved = json.loads((finished_run / "config.json").read_text())
    again = parse_config(["--config", str(finished_run / "config.json")])
    assert again == Config(**saved)
    assert dataclasses.asdict(again) == saved
    # and with a flag over it (a new folder for the repeat): only that option differs
    moved = parse_config(["--config", str(finished_run / "config.json"), "--out", "elsewhere"])
    assert dataclasses.replace(moved, out=saved["out"]) == again and moved.out == "elsewhere"


def test_precedence_flag_over_file_over_recipe_over_preset_over_default(tmp_path):
    # preset digits: batch_size 64, proj_dim 128, image_size 16; recipe reference: proj_dim 256, weight_decay
    # 0.01, optimizer adamw, momentum_schedule constant; the file: weight_decay, epochs, batch_size; flag: epochs.
    path = tmp_path / "options.yaml"
    path.write_text("dataset: digits\nrecipe: reference\nweight-decay: 1e-4\nepochs: 7\nbatch_size: 32\n")
    cfg = parse_config(["--config", str(path), "--epochs", "3"])
    assert cfg.epochs == 3                                   # flag > file
    assert cfg.weight_decay == 1e-4 and cfg.batch_size == 32  # file > recipe, file > preset
    assert cfg.proj_dim == 256 and cfg.momentum_schedule == "constant"  # recipe > preset, recipe > default
    assert cfg.lr == pytest.approx(1e-3 * 256 / 32)          # the recipe's lr, from the file's batch size
    assert cfg.image_size == 16 and cfg.arch == "small_resnet"  # preset > default
    assert cfg.val_fraction == Config.val_fraction           # default


def test_print_config_names_each_options_source_and_reads_back(tmp_path, capsys):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"dataset": "digits", "recipe": "reference", "epochs": 7, "seed": 4}))
    with pytest.raises(SystemExit) as stop:
        parse_config(["--config", str(path), "--epochs", "3", "--print-config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    sources = {line.split(":")[0]: line.split("#", 1)[1].strip() for line in printed.splitlines()
               if not line.startswith("#")}
    assert sources["epochs"] == "flag"
    assert sources["seed"] == sources["dataset"] == f"file {path}"
    assert sources["weight_decay"] == sources["proj_dim"] == "recipe reference"
    assert sources["image_size"] == "preset digits"
    assert sources["val_fraction"] == "default"
    assert set(sources) == {f.name for f in dataclasses.fields(Config)}
    # the output is a config file: it gives the same options back
    (tmp_path / "printed.yaml").write_text(printed)
    assert parse_config(["--config", str(tmp_path / "printed.yaml")]) == parse_config(
        ["--config", str(path), "--epochs", "3"])


def test_print_config_exits_before_training(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rela.train", "--dataset", "digits", "--print-config"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "dataset:" in result.stdout and "# flag" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, message", [
    ("dataset: digits\nbogus_option: 3\nepochz: 2\n", r"unknown option\(s\) bogus_option, epochz"),
    ("epochs: many\n", "epochs must be int, got 'many'"),
    ("- a list\n", "expected a mapping of option: value"),
    ("epochs: [1\n", "cannot parse"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(RelaError, match=message):
        parse_config(["--config", str(path)])
    assert main(["--config", str(path)]) == 1  # the CLI: one line on stderr, non-zero exit, no traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rela.train: error: --config {path}:") and "\n" not in err


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(RelaError, match="no such file"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])
