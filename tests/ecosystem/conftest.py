"""One finished tiny run shared by the ecosystem tests (TensorBoard events, curves.png, config round trip,
rela.eval): digits, RELA handing over to BYOL half way, both loggers on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import FAST_ARGS


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    from rela.train import main

    root = tmp_path_factory.mktemp("ecosystem")
    out = root / "run"
    code = main([*FAST_ARGS, "--out", str(out), "--bank-dir", str(root / "banks"), "--rela-phase", "0.5",
                 "--log-every", "2", "--monitor-every", "6", "--monitor-size", "100", "--logger", "jsonl,tensorboard", "--curves"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["rela_phase_end_step"] < summary["train_steps"]  # both phases ran
    return out
