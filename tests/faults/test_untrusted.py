"""A checkpoint, a target bank or a `run:` prior may come from someone else: one with a malicious pickle
is refused with one line, and the code it carries never runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fault_runs import ARGS
from rela.train import main


class WritesAMarker:
    """Unpickling this calls exec(...), which creates the marker file: what a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("kind", ["checkpoint", "bank", "run prior"])
def test_a_file_with_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path, uninterrupted, capsys, kind):
    marker = tmp_path / "marker"
    payload = WritesAMarker(marker)
    out = tmp_path / "run"
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out)]
    if kind == "checkpoint":
        path = out / "checkpoints" / "ckpt-000000004.pt"
        path.parent.mkdir(parents=True)
        torch.save({"learner": {}, "train_state": payload}, path)
        args += ["--resume", "auto"]
        expected = f"cannot load checkpoint {path}: refused"
    elif kind == "bank":
        path = tmp_path / "bank.pt"
        torch.save({"key": payload, "targets": torch.zeros(2, 2)}, path)
        args += ["--target-bank", str(path)]
        expected = f"cannot read target bank {path}: refused"
    else:
        path = tmp_path / "other-run" / "backbone.pt"
        path.parent.mkdir()
        torch.save({"arch": "small_resnet", "state_dict": payload}, path)
        args += ["--prior", f"run:{path.parent}"]
        expected = f"--prior run:{path.parent}: cannot load {path}: refused"
    assert main(args) == 1
    assert not marker.exists(), "the file's payload ran"
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("rela.train: error:")]
    assert line.startswith(f"rela.train: error: {expected}: it holds Python objects other than tensors and plain "
                           "data, and loading it could run code (")
    assert line.endswith("(it asks the unpickler for exec)")
    assert "Traceback" not in err
