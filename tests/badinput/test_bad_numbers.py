"""Numeric options out of range (NaN and inf included): refused in one line naming the option, before any
work, whether the value comes from a flag or a config file. Every numeric option declares its bounds in
rela/config.py's table, so a new option cannot skip the check."""
from __future__ import annotations

import dataclasses
import json

import pytest

from badfiles import run_trainer
from builders import FAST_ARGS
from rela.config import Config

# Each was accepted before (a silently wrong kNN, a momentum above 1, a rule that never or always fires), or
# gave a traceback or a runaway run (a 100000-pixel crop, 1000 workers, a NaN learning rate).
BAD_VALUES = [
    ("--knn-temperature", "nan", "a finite number > 0"),
    ("--base-momentum", "1.5", "a finite number in [0, 1]"),
    ("--rela-threshold", "nan", "a finite number in (0, 1]"),
    ("--rela-averaging-scale", "nan", "a finite number in (0, 99]"),
    ("--prior-size", "0", "an integer in [1, 4096]"),
    ("--prior-size", "-5", "an integer in [1, 4096]"),
    ("--lr", "nan", "a finite number > 0"),
    ("--lr", "-1", "a finite number > 0"),
    ("--lr", "inf", "a finite number > 0"),
    ("--seed", "-1", "an integer in [0, 2147483647]"),
    ("--warmup-epochs", "nan", "a finite number >= 0"),
    ("--dino-teacher-temp", "nan", "a finite number > 0"),
    ("--image-size", "100000", "an integer in [1, 4096]"),
    ("--workers", "1000", "an integer in [0, 256]"),
]


@pytest.mark.parametrize("option, value, bounds", BAD_VALUES, ids=[f"{o}={v}" for o, v, _ in BAD_VALUES])
def test_a_bad_number_is_refused_in_one_line_naming_the_option(tmp_path, capsys, option, value, bounds):
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, option, value).error_line
    shown = str(float(value)) if bounds.startswith("a finite") else value
    assert line == f"rela.train: error: {option} must be {bounds}, got {shown}"
    assert not (tmp_path / "run").exists(), "a refused run creates nothing"


@pytest.mark.parametrize("option, value, bounds", BAD_VALUES[:4], ids=[o for o, _, _ in BAD_VALUES[:4]])
def test_a_bad_number_in_a_config_file_is_refused_alike(tmp_path, capsys, option, value, bounds):
    config = tmp_path / "options.yaml"
    config.write_text(f"{option[2:]}: {value}\n")
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--config", str(config)).error_line
    assert line.startswith(f"rela.train: error: {option} must be {bounds}, got ")


def test_rela_eval_refuses_a_nan_knn_temperature(tmp_path, capsys):
    """Before: the kNN's votes were all NaN and it scored a silently wrong accuracy."""
    import torch

    from rela.eval.standalone import main as eval_main
    from rela.models.backbones import build_backbone

    backbone = tmp_path / "backbone.pt"
    torch.save({"arch": "small_resnet", "state_dict": build_backbone("small_resnet").state_dict()}, backbone)
    code = eval_main([str(backbone), "--dataset", "digits", "--knn-temperature", "nan", "--device", "cpu",
                      "--no-progress", "--probe-epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == "rela.eval: error: --knn-temperature must be a finite number > 0, got nan"


def test_every_numeric_option_declares_its_bounds():
    """A new int or float option without `bounds=` in rela/config.py's table fails here."""
    from rela.config import numeric_options

    fields = {f.name: f for f in dataclasses.fields(Config)}
    numeric = numeric_options()
    assert {"lr", "seed", "workers", "prior_size", "knn_temperature"} <= set(numeric)
    assert [name for name in numeric if fields[name].metadata.get("bounds") is None] == []
    for name, kind in numeric.items():  # each default lies inside its own bounds
        default = fields[name].default
        assert default is None or default in fields[name].metadata["bounds"], name
