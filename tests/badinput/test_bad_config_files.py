"""Option files that are not what they claim: a --config that is not UTF-8 or is a YAML alias bomb, a value
megabytes long, a run's config.json given to rela.eval that is not JSON or holds values of the wrong type.
Each is refused in one short line naming the file (before: a traceback, or a 58 MB error line)."""
from __future__ import annotations

import json

import pytest
import torch

from badfiles import run_trainer
from builders import FAST_ARGS


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_bytes("seed: 3  # réglé\n".encode("latin-1"))
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--config", str(config)).error_line
    assert line == f"rela.train: error: --config {config}: not UTF-8 text (byte 12 is 0xe9); save it as UTF-8"


def billion_laughs(levels: int) -> str:
    """YAML of a few hundred bytes whose option `seed` expands to 9**levels strings."""
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "seed:\n" + "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_unexpanded(tmp_path, capsys):
    """Before: the error line echoed the expanded value, 4.8 million strings here (34 MB)."""
    config = tmp_path / "bomb.yaml"
    config.write_text(billion_laughs(7))
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--config", str(config)).error_line
    assert line == (f"rela.train: error: --config {config}: more than 16 YAML aliases (*name): refused, as such a "
                    "file can expand to gigabytes; write the values out")


def test_a_huge_value_is_echoed_in_a_short_line(tmp_path, capsys):
    """Before: the error line repeated the whole value (58 MB for a bomb's)."""
    config = tmp_path / "long.json"
    config.write_text(json.dumps({"seed": ["lol"] * 100_000}))
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--config", str(config)).error_line
    assert line.startswith(f"rela.train: error: --config {config}: seed must be int, got ['lol', 'lol', ")
    assert line.endswith("... (700000 characters)") and len(line) < 400


@pytest.fixture
def run_folder(tmp_path):
    from rela.models.backbones import build_backbone

    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"arch": "small_resnet", "state_dict": build_backbone("small_resnet").state_dict(), "image_size": 16,
                "mean": [0.2] * 3, "std": [0.33] * 3}, folder / "backbone.pt")
    return folder


@pytest.mark.parametrize("text, message", [
    ('{"dataset": "digits", "seed": ', "not a run's config.json: Expecting value: line 1 column 31 (char 30)"),
    ('["digits"]', "expected a mapping of option: value, got list"),
    ('{"dataset": "digits", "seed": "zero"}', "seed must be int, got 'zero'"),
    ('{"dataset": "digits", "knn_k": 2.5}', "knn_k must be int, got 2.5"),
])
def test_rela_eval_names_a_malformed_or_wrongly_typed_config_json(run_folder, capsys, text, message):
    from rela.eval.standalone import main as eval_main

    (run_folder / "config.json").write_text(text)
    assert eval_main([str(run_folder), "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"rela.eval: error: {run_folder / 'config.json'}: {message}\n"
