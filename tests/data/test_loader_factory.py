"""rela/data/factory.py: which loader `--loader torch|dali|auto` gives, and what create_loaders builds."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (the [dali] extra; a missing install must fail, not skip)

from rela.config import Config  # noqa: E402
from rela.data import factory  # noqa: E402
from rela.data.budget import BudgetSampler  # noqa: E402
from rela.data.dali import DaliImageSource, DaliTrainLoader  # noqa: E402
from rela.data.datasets import ArrayImages, DatasetSplits  # noqa: E402
from rela.data.loader import TorchImageSource, TorchTrainLoader  # noqa: E402
from rela.data.views import BYOL_VIEWS, Normalize  # noqa: E402
from rela.errors import RelaError  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # choose_loader only reads the device's type


def _cfg(**options) -> Config:
    return dataclasses.replace(Config(), **options)


@pytest.mark.parametrize("loader,device,expected", [
    ("torch", CPU, False), ("torch", CUDA, False),
    ("dali", CPU, True), ("dali", CUDA, True),
    ("auto", CPU, False), ("auto", CUDA, True),  # auto: DALI on any CUDA device where it is installed
])
def test_choose_loader(loader, device, expected):
    assert factory.choose_loader(_cfg(loader=loader), device) is expected


def test_choose_loader_without_dali(monkeypatch):
    monkeypatch.setattr(factory, "dali_available", lambda: False)
    with pytest.raises(RelaError, match="--loader dali"):
        factory.choose_loader(_cfg(loader="dali"), CPU)
    assert factory.choose_loader(_cfg(loader="auto"), CUDA) is False
    assert factory.choose_loader(_cfg(loader="torch"), CPU) is False


@pytest.mark.parametrize("loader,source_type,loader_type", [
    ("torch", TorchImageSource, TorchTrainLoader), ("auto", TorchImageSource, TorchTrainLoader),
    ("dali", DaliImageSource, DaliTrainLoader),
])
def test_create_loaders_builds_the_chosen_loader(loader, source_type, loader_type):
    n = 24
    images = np.random.default_rng(0).integers(0, 256, (n, 20, 20, 3), dtype=np.uint8)
    train = ArrayImages(images, np.arange(n) % 4, "train")
    splits = DatasetSplits(train, train, 4, (0.5,) * 3, (0.25,) * 3, native_size=20)
    cfg = _cfg(loader=loader, image_size=16, workers=1, rela_crop_min_scale=0.5, byol_crop_min_scale=0.3)
    sampler = BudgetSampler(n, 1.0, 8, seed=0)
    made = factory.create_loaders(cfg, splits, sampler, Normalize(splits.mean, splits.std, CPU), CPU, seed=4,
                                  method_views=BYOL_VIEWS)
    assert made.use_dali is (loader == "dali")
    assert type(made.train_source) is source_type and type(made.train_loader) is loader_type
    assert made.train_source.dataset is train and made.train_source.device == CPU
    assert made.train_loader.crop_min_scale == {"rela": 0.5, "byol": 0.3}
    made.train_loader.set_view_mode("rela")
    assert made.train_loader.views[0].crop_scale == (0.5, 1.0)
    batches = list(made.train_loader.epoch(0))
    assert torch.cat([b.index for b in batches]).tolist() == sampler.rank_indices(0).tolist()
    assert batches[0].view1.shape == (8, 3, 16, 16) and {b.views for b in batches} == {"rela"}


def test_factory_and_dali_package_import_without_dali():
    """Without DALI, the factory (hence the trainer) imports, `--loader auto` is torch and dali says why."""
    code = (
        "import sys; sys.modules['nvidia.dali'] = None  # as if not installed\n"
        "import dataclasses, torch\n"
        "from rela.config import Config\n"
        "from rela.data import factory\n"
        "from rela.data.dali import dali_available\n"
        "from rela.errors import RelaError\n"
        "assert not dali_available()\n"
        "assert factory.choose_loader(dataclasses.replace(Config(), loader='auto'), torch.device('cuda')) is False\n"
        "try:\n"
        "    factory.choose_loader(dataclasses.replace(Config(), loader='dali'), torch.device('cpu'))\n"
        "except RelaError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NVIDIA DALI is not installed" in result.stdout
