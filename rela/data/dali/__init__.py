"""NVIDIA DALI loaders behind the torch loader's interfaces (`--loader dali`).

    pipelines.py  the DALI graphs (`@pipeline_def`): two augmented views; resize + center crop
    driver.py     the host side: reads files, draws each step's random choices, feeds the steps
    loaders.py    DaliTrainLoader (a TrainLoader) and DaliImageSource (an ImageSource)

DALI is imported only when a loader is built: this package imports without it, and `dali_available()`
says whether it can be used.
"""
from __future__ import annotations

from rela.data.dali.loaders import DaliImageSource, DaliTrainLoader

__all__ = ["DaliImageSource", "DaliTrainLoader", "dali_available"]


def dali_available() -> bool:
    """True when NVIDIA DALI imports (it also runs without a GPU, on CPU operators)."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # not installed, or its CUDA libraries do not load
        return False
    return True
