"""Both loaders (torch, and DALI on its CPU twin) are the Protocols of rela/data/interfaces.py, and each
batch says which views it was made with, switching at exactly the step asked for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (the [dali] extra; a missing install must fail, not skip)

from rela.data.budget import BudgetSampler  # noqa: E402
from rela.data.dali import DaliImageSource, DaliTrainLoader  # noqa: E402
from rela.data.datasets import ArrayImages  # noqa: E402
from rela.data.interfaces import ImageSource, TrainLoader  # noqa: E402
from rela.data.loader import TorchImageSource, TorchTrainLoader  # noqa: E402
from rela.data.views import Normalize  # noqa: E402

CPU = torch.device("cpu")
KINDS = ["torch", "dali"]


def _build(kind: str, dataset: ArrayImages, batch_size: int, view_mode: str, prefetch: int = 2
           ) -> tuple[ImageSource, TrainLoader]:
    sampler = BudgetSampler(len(dataset), 1.0, batch_size, seed=0)
    common = dict(image_size=16, normalize=Normalize((0, 0, 0), (1, 1, 1), CPU), seed=1, view_mode=view_mode)
    if kind == "torch":
        source = TorchImageSource(dataset, CPU)
        return source, TorchTrainLoader(source, sampler, decode_size=24, **common)
    return (DaliImageSource(dataset, CPU, num_threads=1),
            DaliTrainLoader(dataset, sampler, device=CPU, num_threads=2, prefetch=prefetch, **common))


@pytest.mark.parametrize("kind", KINDS)
def test_loaders_are_the_protocols(kind):
    dataset = ArrayImages(np.zeros((16, 24, 24, 3), np.uint8), np.zeros(16), "black")
    source, loader = _build(kind, dataset, batch_size=4, view_mode="rela")
    assert isinstance(source, ImageSource) and isinstance(loader, TrainLoader)
    assert not isinstance(source, TrainLoader) and not isinstance(loader, ImageSource)
    assert source.device == CPU and source.dataset is dataset
    assert source.skipped == set() and loader.skipped == set()
    assert loader.steps_per_epoch == 4 and loader.view_mode == "rela"
    with pytest.raises(AttributeError):
        loader.view_mode = "byol"  # read-only: set_view_mode changes the views too
    loader.set_view_mode("byol")
    assert loader.view_mode == "byol" and loader.state_dict()["view_mode"] == "byol"
    images = source.load(torch.tensor([3, 1]), size=8, crop_fraction=1.0)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    (images, index), = source.iterate([np.arange(5)], mode="eval", size=8, crop_fraction=1.0)
    assert images.shape == (5, 3, 8, 8) and index.tolist() == list(range(5))


@pytest.mark.parametrize("kind", KINDS)
def test_batches_say_which_views_they_were_made_with(kind):
    """RELA's views never solarize, BYOL's second view does (p=0.2: some of 64 samples, always), so a
    light image tells the views apart. The DALI loader has steps fed ahead when the switch comes: those
    are made again, and the batch's `views` must say what it was really made with."""
    images = np.full((64 * 8, 24, 24, 3), 245, np.uint8)  # solarized <=> no pixel above 0.5
    _, loader = _build(kind, ArrayImages(images, np.zeros(len(images)), "light"), batch_size=64,
                       view_mode="rela", prefetch=2)
    switches = {2: "byol", 5: "rela"}  # before the batch of step 2, and before step 5
    made_with, said = [], []
    for step, batch in enumerate(loader.epoch(0)):
        solarized = int((batch.view2.float().amax((1, 2, 3)) <= 0.5).sum())
        made_with.append("byol" if solarized else "rela")
        said.append(batch.views)
        if step + 1 in switches:
            loader.set_view_mode(switches[step + 1])
            assert loader.view_mode == switches[step + 1]
    assert made_with == ["rela", "rela", "byol", "byol", "byol", "rela", "rela", "rela"]
    assert said == made_with
