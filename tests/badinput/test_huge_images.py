"""An image whose header claims more pixels than any photo (a PNG of 169 megapixels is 23 kB on disk and
2.7 GB decoded): refused from its header, before decoding, as a corrupt file that --skip-corrupt skips."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from badfiles import IMAGEFOLDER_ARGS, png_bytes, run_trainer, shown
from builders import write_imagefolder
from rela.data.datasets import CorruptImageError, decode_image


@pytest.mark.parametrize("width, height", [(13000, 13000), (8200, 8200)])  # 169 and 67 megapixels
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(width, height))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning over 89.5M pixels
        with pytest.raises(CorruptImageError) as err:
            decode_image(path)
    assert time.perf_counter() - start < 1.0, "the image was decoded"
    assert str(err.value) == (f"cannot decode image {shown(path)}: {width} x {height} pixels "
                              f"({width * height / 1e6:.0f} megapixels) is over the decode limit of 67 megapixels "
                              "(pass --skip-corrupt to skip such files)")


def test_an_image_at_the_limit_decodes(tmp_path):
    path = tmp_path / "large.png"
    path.write_bytes(png_bytes(8192, 82))  # 8192 x 8 would be over the 100:1 aspect limit
    assert decode_image(path).shape == (82, 8192, 3)


def test_a_huge_image_is_skipped_with_skip_corrupt(tmp_path, capsys):
    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=8, size=(24, 20))
    (tree / "class_1" / "img_007.jpg").unlink()
    (tree / "class_1" / "huge.png").write_bytes(png_bytes(13000, 13000))
    outcome = run_trainer(capsys, tmp_path, *IMAGEFOLDER_ARGS, "--data", str(tree), "--prior", "none",
                          "--skip-corrupt")
    assert outcome.code == 0, outcome.err[-3000:]
    assert outcome.summary["skipped_corrupt"] == 1 or outcome.summary["skipped_corrupt_in_validation"] == 1
    assert np.isfinite(outcome.summary["knn_top1"])
