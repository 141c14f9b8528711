"""The uninterrupted run that every fault test's resumed run must end like (once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fault_runs import ARGS
from rela.train import main


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main([*ARGS, "--bank-dir", str(root / "banks"), "--out", str(root / "run")]) == 0
    return root / "run"
