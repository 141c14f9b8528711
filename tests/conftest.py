"""Fixtures shared by the trainer's tests (the builders live in tests/builders.py).

On a machine without a GPU the fused ops run in Triton's interpreter, which must be chosen before
Triton is imported (triton.jit reads TRITON_INTERPRET when it defines a kernel): this file is loaded
before any test module, so it sets the variable here unless the caller chose (TRITON_INTERPRET=0 runs
the references on the CPU, as users without a GPU get them). torch.cuda does not import Triton.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from builders import write_cifar10, write_imagefolder  # noqa: E402


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "images")


@pytest.fixture
def cifar10(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "cifar")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests check code paths that only exist on CUDA (DALI's GPU operators, the pinned
    ring's side stream); without a GPU they are skipped with the reason, not silently passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
