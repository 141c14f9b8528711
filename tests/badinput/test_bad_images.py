"""Images the loaders meet: every PIL mode trains; a file that does not decode is named, or skipped and counted.

The ImageFolder path runs the torch loader here (DALI reads files only on CUDA); DALI's CPU decode path gets the
same files where that is cheap (no training)."""
from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badfiles import IMAGEFOLDER_ARGS, coloured_rgb, png_bytes, run_trainer, shown
from rela.data.datasets import CorruptImageError, FileImages, decode_image

NON_UTF8 = b"caf\xe9"  # Latin-1 bytes: not UTF-8, so Python keeps the name as surrogates


def _mode_images(rgb: np.ndarray) -> dict[str, tuple[Image.Image, str]]:
    """name -> (image, format) in each mode a photo collection holds besides RGB."""
    grey16 = (rgb.mean(-1) * 257).astype(np.uint16)  # the full 16-bit range
    return {
        "grey.png": (Image.fromarray(rgb).convert("L"), "PNG"),
        "grey.jpg": (Image.fromarray(rgb).convert("L"), "JPEG"),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "cmyk.tif": (Image.fromarray(rgb).convert("CMYK"), "TIFF"),
        "grey16.png": (Image.fromarray(grey16), "PNG"),  # opens as I;16
        "palette.png": (Image.fromarray(rgb).convert("P"), "PNG"),
        "alpha.png": (Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "grey_alpha.png": (Image.fromarray(rgb).convert("LA"), "PNG"),
        "bilevel.png": (Image.fromarray(rgb).convert("1"), "PNG"),
    }


def _expected_rgb(name: str, image: Image.Image, rgb: np.ndarray) -> np.ndarray:
    if name == "grey16.png":
        return np.repeat(np.rint(np.asarray(image, np.float64) / 257).astype(np.uint8)[..., None], 3, axis=2)
    if name.startswith("cmyk"):
        return rgb  # JPEG's loss aside, CMYK converted from RGB converts back
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("name", list(_mode_images(coloured_rgb(0))))
def test_every_image_mode_decodes_to_its_rgb(tmp_path, name):
    """Before the fix a 16-bit grey PNG (I;16) came out white: PIL's convert("RGB") clips at 255."""
    rgb = coloured_rgb(1)
    image, fmt = _mode_images(rgb)[name]
    image.save(tmp_path / name, format=fmt)
    with Image.open(tmp_path / name) as opened:
        mode = opened.mode
    decoded = decode_image(tmp_path / name)
    assert decoded.dtype == np.uint8 and decoded.shape == rgb.shape, (mode, decoded.shape)
    error = np.abs(decoded.astype(np.int16) - _expected_rgb(name, image, rgb).astype(np.int16))
    assert error.mean() < (12 if fmt == "JPEG" else 0.5), (mode, error.mean())


def _unusual_tree(root: Path) -> Path:
    """train/ and val/ of two classes, training images in every mode, a 1x1 image, a non-UTF-8 name and
    files that are not images (ignored by their suffix)."""
    for split, count in (("train", 4), ("val", 2)):
        for k in range(2):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(coloured_rgb(k, seed=i)).save(folder / f"img_{i}.jpg", quality=90)
    modes = list(_mode_images(coloured_rgb(0)).items())
    for j, (name, (image, fmt)) in enumerate(modes):
        k = j % 2
        image = _mode_images(coloured_rgb(k, seed=10 + j))[name][0]
        image.save(root / "train" / f"class_{k}" / name, format=fmt)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(root / "train" / "class_0" / "one_pixel.png")
    Image.fromarray(coloured_rgb(1, seed=40)).save(
        os.path.join(os.fsencode(root / "train" / "class_1"), NON_UTF8 + b".png"))
    (root / "train" / "class_0" / "notes.txt").write_text("not an image")
    (root / "train" / "class_1" / "Thumbs.db").write_bytes(b"\0" * 64)
    return root


def test_unusual_images_train(tmp_path, capsys):
    """Grey, CMYK, 16-bit, palette, alpha and bilevel images, a 1x1 image and a non-UTF-8 file name train
    through the prior's pass and the training steps; nothing is skipped. Before the fix the non-UTF-8 name
    failed the dataset's fingerprint (UnicodeEncodeError)."""
    tree = _unusual_tree(tmp_path / "tree")
    outcome = run_trainer(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree), "--prior", "rand")
    assert outcome.code == 0, outcome.err[-3000:]
    assert outcome.summary["skipped_corrupt"] == 0
    # The prior's pass encodes all 19 training images; the epoch trains on whole batches of 4 (the short last
    # one dropped), so 16 of them, each once.
    assert outcome.summary["images_seen"] == (8 + 9 + 2) // 4 * 4


# ---- Files that do not decode ---------------------------------------------------------------------------

def _tree(root: Path) -> Path:
    """train/class_k with 6 images each, val/class_k with 2: 12 training images, three batches of 4."""
    for split, count in (("train", 6), ("val", 2)):
        for k in range(2):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(coloured_rgb(k, seed=i)).save(folder / f"img_{i}.jpg", quality=90)
    return root


def _unreadable(path: Path, monkeypatch) -> None:
    """chmod 000; as root, which reads such files anyway, open() of that path fails as it would for a user."""
    path.chmod(0)
    if not os.access(path, os.R_OK):
        return
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)


def make_bad_file(kind: str, folder: Path, monkeypatch, name: str = "bad") -> Path:
    """One file of `kind` in `folder`, in place of a good image; returns its path."""
    good = folder / "img_0.jpg"
    if kind == "truncated_jpeg":
        path = folder / f"{name}.jpg"
        path.write_bytes(good.read_bytes()[:200])
    elif kind == "not_an_image":
        path = folder / f"{name}.jpg"
        path.write_text("<html>an error page saved as a JPEG</html>")
    elif kind == "decompression_bomb":  # 180M pixels claimed, over Pillow's limit of 2 x 89.5M
        path = folder / f"{name}.png"
        path.write_bytes(png_bytes(20000, 9000))
    elif kind == "unreadable":
        path = folder / f"{name}.jpg"
        shutil.copy(good, path)
        _unreadable(path, monkeypatch)
    elif kind == "symlink_loop":  # bad.jpg -> bad.lnk -> bad.jpg
        path = folder / f"{name}.jpg"
        os.symlink(f"{name}.lnk", path)
        os.symlink(f"{name}.jpg", folder / f"{name}.lnk")
    elif kind == "non_utf8_name":
        raw = os.path.join(os.fsencode(folder), NON_UTF8 + name.encode() + b".jpg")
        with open(raw, "wb") as fh:
            fh.write(good.read_bytes()[:200])
        path = Path(os.fsdecode(raw))
    else:
        raise ValueError(kind)
    return path


BAD_KINDS = ["truncated_jpeg", "not_an_image", "decompression_bomb", "unreadable", "symlink_loop", "non_utf8_name"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_is_named_in_one_line(tmp_path, capsys, monkeypatch, kind):
    tree = _tree(tmp_path / "tree")
    (tree / "train" / "class_1" / "img_5.jpg").unlink()  # the bad file takes its place: still 12
    bad = make_bad_file(kind, tree / "train" / "class_1", monkeypatch)
    line = run_trainer(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree), "--prior", "none").error_line
    assert f"rela.train: error: cannot decode image {shown(bad)}: " in line and "--skip-corrupt" in line
    if kind == "decompression_bomb":
        assert "decompression bomb" in line


def test_bad_files_are_skipped_and_counted(tmp_path, capsys, monkeypatch):
    """--skip-corrupt: one file of each kind in the training set, each skipped and counted once; a corrupt
    validation file is left out of the scores and counted on its own."""
    tree = _tree(tmp_path / "tree")
    for k, kind in enumerate(BAD_KINDS):
        (tree / "train" / f"class_{k % 2}" / f"img_{5 - k // 2}.jpg").unlink()
        make_bad_file(kind, tree / "train" / f"class_{k % 2}", monkeypatch, name=f"bad_{kind}")
    make_bad_file("truncated_jpeg", tree / "val" / "class_0", monkeypatch, name="bad_val")
    outcome = run_trainer(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree), "--prior", "rand",
                          "--skip-corrupt")
    assert outcome.code == 0, outcome.err[-3000:]
    assert outcome.summary["skipped_corrupt"] == len(BAD_KINDS)
    assert outcome.summary["skipped_corrupt_in_training"] == len(BAD_KINDS)
    assert outcome.summary["skipped_corrupt_in_validation"] == 1
    assert "1 corrupt validation images left out of the scores" in outcome.err


# ---- DALI's CPU decode path --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BAD_KINDS)
def test_dali_names_a_bad_file(tmp_path, monkeypatch, kind):
    """Before the fix DALI's host reader let Pillow's DecompressionBombError through as a traceback."""
    pytest.importorskip("nvidia.dali")
    from rela.data.dali.loaders import DaliImageSource

    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("as root a chmod 000 file reads, and DALI's reader opens it in C (np.fromfile)")
    tree = _tree(tmp_path / "tree")
    folder = tree / "train" / "class_0"
    bad = make_bad_file(kind, folder, monkeypatch)
    files = [f"class_0/img_{i}.jpg" for i in range(3)] + [os.path.relpath(bad, tree / "train")]
    dataset = FileImages(tree / "train", files, np.zeros(len(files)), "bad")
    with pytest.raises(CorruptImageError) as err:
        list(DaliImageSource(dataset, torch.device("cpu"), num_threads=1).iterate([np.arange(4)], size=16))
    assert shown(bad) in str(err.value)
    source = DaliImageSource(dataset, torch.device("cpu"), num_threads=1, skip_corrupt=True)
    assert torch.cat([index for _, index in source.iterate([np.arange(4)], size=16)]).tolist() == [0, 1, 2]
    assert source.skipped == {3}


def test_dali_and_torch_decode_every_mode_alike(tmp_path):
    """The same mode files through DALI's CPU decoder and the torch loader's PIL path: the same images, but
    for resampling (before the fix the 16-bit PNG differed by ~125 levels: white against grey)."""
    pytest.importorskip("nvidia.dali")
    from rela.data.dali.loaders import DaliImageSource
    from rela.data.loader import TorchImageSource

    files = []
    for name, (image, fmt) in _mode_images(coloured_rgb(2, size=(32, 32))).items():
        image.save(tmp_path / name, format=fmt)
        files.append(name)
    dataset = FileImages(tmp_path, files, np.zeros(len(files)), "modes")
    index = torch.arange(len(files))
    cpu = torch.device("cpu")
    dali = DaliImageSource(dataset, cpu, num_threads=1).load(index, size=16, crop_fraction=1.0).float()
    ours = TorchImageSource(dataset, cpu).load(index, size=16, crop_fraction=1.0).float()
    per_image = dict(zip(files, (dali - ours).abs().mean(dim=(1, 2, 3)).tolist()))
    assert all(error < 10 for error in per_image.values()), per_image  # CMYK JPEG: ~6, colour conversion
    assert per_image["grey16.png"] < 1, per_image
