"""Data folders that cannot make a dataset: each is refused in one line naming the folder or file, before anything
is written."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from badfiles import IMAGEFOLDER_ARGS, run_trainer
from builders import FAST_ARGS, write_cifar10, write_imagefolder


def _refused(capsys, tmp_path, *args) -> str:
    outcome = run_trainer(capsys, tmp_path, *args)
    line = outcome.error_line
    assert not any((tmp_path / "run").glob("*")), "a refused run writes nothing"
    return line


def test_empty_class_folder_is_named(tmp_path, capsys):
    """Before: the empty folder became a class without images, silently (the probe's classes then counted it)."""
    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=6)
    (tree / "class_2").mkdir()
    (tree / "class_2" / "readme.txt").write_text("images to come")
    line = _refused(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree))
    assert f"class folder {tree / 'class_2'} holds no images" in line


def test_tree_with_one_class_is_refused(tmp_path, capsys):
    """Before: it trained, and the probe and kNN reported 100% on one class."""
    tree = write_imagefolder(tmp_path / "tree", classes=1, per_class=12)
    line = _refused(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree))
    assert f"{tree} has one class folder (class_0)" in line and "at least two classes" in line


def test_symlink_loop_between_folders_is_named(tmp_path, capsys):
    """Before: os.walk followed class_0/loop -> .. until the path grew too long, listing every image ~30 times."""
    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=6)
    os.symlink("..", tree / "class_0" / "loop")
    line = _refused(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree))
    assert f"symbolic link loop: {tree / 'class_0' / 'loop'} leads back to a folder above it" in line


def test_links_to_folders_elsewhere_are_followed(tmp_path):
    """The loop check leaves links to folders outside the walk alone (shared image folders)."""
    from rela.data.datasets import load_dataset

    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=4)
    extra = write_imagefolder(tmp_path / "extra", classes=1, per_class=3) / "class_0"
    os.symlink(extra, tree / "class_1" / "more")
    splits = load_dataset("imagefolder", str(tree), val_fraction=0.25)
    assert len(splits.train) + len(splits.val) == 11


def test_unreadable_class_folder_is_named(tmp_path, capsys, monkeypatch):
    """Before: os.walk skipped a folder it could not list, and its images went missing without a word."""
    tree = write_imagefolder(tmp_path / "tree", classes=3, per_class=4)
    locked = tree / "class_1"
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root lists it anyway: fail the listing as it fails for a user
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fsdecode(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        line = _refused(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree))
    finally:
        locked.chmod(0o755)
    assert f"cannot list folder {locked}: Permission denied" in line


# ---- CIFAR batch files --------------------------------------------------------------------------------------

CIFAR_DAMAGE = {
    # HWC images (another library's layout): they reshaped without complaint into scrambled images
    "hwc_layout": (lambda data, labels: {b"data": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)},
                   "data is uint8 (40, 32, 32, 3), expected uint8 (N, 3072)"),
    # one grey plane per image: 3 grey rows made one RGB image, a third of the images silently
    "grey_rows": (lambda data, labels: {b"data": data[:39, :1024].copy()},
                  "data is uint8 (39, 1024), expected uint8 (N, 3072)"),
    "float_pixels": (lambda data, labels: {b"data": data.astype(np.float32) / 255},
                     "data is float32 (40, 3072), expected uint8"),
    "labels_short": (lambda data, labels: {b"labels": labels[:-3]},
                     "(37,) labels of int64 for 40 images"),
    "label_out_of_range": (lambda data, labels: {b"labels": [*labels[:-1], 10]},
                           "labels span 0..10, expected 0..9 for cifar10"),
    "missing_key": (lambda data, labels: {b"labels": None},
                    "labels of object for 40 images"),
}


@pytest.mark.parametrize("damage", list(CIFAR_DAMAGE))
def test_cifar_batch_of_the_wrong_shape_is_named(tmp_path, capsys, damage):
    root = write_cifar10(tmp_path / "cifar", per_batch=40)
    batch = root / "data_batch_3"
    with open(batch, "rb") as fh:
        content = pickle.load(fh, encoding="bytes")
    change, expected = CIFAR_DAMAGE[damage]
    content.update(change(content[b"data"], content[b"labels"]))
    with open(batch, "wb") as fh:
        pickle.dump(content, fh)
    line = _refused(capsys, tmp_path, *FAST_ARGS, "--dataset", "cifar10", "--data", str(root), "--prior", "none")
    assert f"CIFAR batch {batch}: " in line and expected in line, line


def test_truncated_cifar_batch_is_named(tmp_path, capsys):
    root = write_cifar10(tmp_path / "cifar", per_batch=40)
    batch = root / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    line = _refused(capsys, tmp_path, *FAST_ARGS, "--dataset", "cifar10", "--data", str(root), "--prior", "none")
    assert f"cannot read CIFAR batch {batch}: " in line
