"""Fixtures shared by the trainer's tests (the builders live in tests/builders.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from builders import write_cifar10, write_imagefolder


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "images")


@pytest.fixture
def cifar10(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "cifar")
