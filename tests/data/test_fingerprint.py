"""The dataset fingerprint that keys the target bank: an image edited in place must not reuse a stale bank."""
from __future__ import annotations

import os
from pathlib import Path

from builders import write_imagefolder
from rela.data.datasets import load_dataset


def _train_fingerprint(root: Path) -> str:
    return load_dataset("imagefolder", str(root)).train.fingerprint()


def test_unchanged_tree_keeps_its_fingerprint(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    assert _train_fingerprint(root) == _train_fingerprint(root)


def test_file_rewritten_with_same_size_changes_the_fingerprint(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    before = _train_fingerprint(root)
    path = load_dataset("imagefolder", str(root)).train.path(0)
    data, stat = path.read_bytes(), path.stat()
    path.write_bytes(bytes(255 - b for b in data))  # other bytes, same size
    # An explicit later time: the test must not depend on the file system's timer resolution.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == stat.st_size
    assert _train_fingerprint(root) != before

