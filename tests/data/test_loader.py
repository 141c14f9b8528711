"""The torch loader's two views: shapes, dtype and layout, normalisation, that the views differ, that a
seeded loader repeats itself, and that crops honour crop_min_scale."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rela.data.budget import BudgetSampler
from rela.data.datasets import ArrayImages, FileImages
from rela.data.loader import TorchImageSource, TorchTrainLoader
from rela.data.views import Normalize

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


def _noise_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (n, size, size, 3) uint8: every image different, all of [0, 255] used."""
    low = torch.from_numpy(np.random.default_rng(seed).random((n, 3, 5, 5)).astype(np.float32))
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _arrays(n: int = 40, size: int = 24, seed: int = 0) -> ArrayImages:
    return ArrayImages(_noise_images(n, size, seed), np.arange(n) % 5, "noise")


def _files(root: Path, n: int = 20) -> FileImages:
    from PIL import Image

    rng = np.random.default_rng(1)
    files = []
    for i, image in enumerate(_noise_images(n, 30, seed=2)):
        height, width = int(rng.integers(24, 40)), int(rng.integers(24, 40))
        rel = f"class_{i % 3}/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((width, height)).save(root / rel)
        files.append(rel)
    return FileImages(root, files, np.arange(n) % 3, "noise-files")


def _loader(dataset, *, seed: int = 7, batch_size: int = 8, normalize: Normalize | None = None,
            view_mode: str = "byol", crop_min_scale=None, image_size: int = 16) -> TorchTrainLoader:
    sampler = BudgetSampler(len(dataset), 1.0, batch_size, seed=3)
    return TorchTrainLoader(TorchImageSource(dataset, CPU), sampler, image_size=image_size, decode_size=28,
                            normalize=normalize or Normalize(MEAN, STD, CPU), seed=seed, view_mode=view_mode,
                            crop_min_scale=crop_min_scale)


@pytest.mark.parametrize("kind", ["arrays", "files"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_views_have_the_model_shape_dtype_and_layout(tmp_path, kind, dtype, channels_last):
    dataset = _arrays() if kind == "arrays" else _files(tmp_path)
    loader = _loader(dataset, normalize=Normalize(MEAN, STD, CPU, dtype=dtype, channels_last=channels_last))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    for batch in loader.epoch(0):
        for view in (batch.view1, batch.view2):
            assert view.shape == (len(batch.index), 3, 16, 16) and view.dtype == dtype
            assert view.is_contiguous(memory_format=memory_format)
            assert torch.isfinite(view.float()).all()
        assert batch.index.dtype == batch.label.dtype == torch.int64
        assert torch.equal(batch.label, torch.as_tensor(dataset.labels)[batch.index])
        assert batch.views == "byol"
        seen.extend(batch.index.tolist())
    assert seen == loader.sampler.rank_indices(0).tolist()


@pytest.mark.parametrize("view_mode", ["byol", "rela"])
def test_views_are_normalised_images_in_the_unit_range(view_mode):
    """Normalising is (x - mean) / std of views in [0, 1]: the same seed with mean 0 and std 1 gives x."""
    dataset = _arrays()
    normalized = list(_loader(dataset, view_mode=view_mode).epoch(0))
    unit = list(_loader(dataset, view_mode=view_mode, normalize=Normalize((0, 0, 0), (1, 1, 1), CPU)).epoch(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for a, x in zip(normalized, unit):
        for view, raw in ((a.view1, x.view1), (a.view2, x.view2)):
            assert raw.min() >= 0 and raw.max() <= 1
            torch.testing.assert_close(view, (raw - mean) / std)
    everything = torch.cat([x.view1 for x in unit])
    assert everything.min() < 0.1 and everything.max() > 0.9  # the images' range survives the views


@pytest.mark.parametrize("view_mode", ["byol", "rela"])
def test_two_views_of_one_image_differ(view_mode):
    for batch in _loader(_arrays(), view_mode=view_mode).epoch(0):
        difference = (batch.view1 - batch.view2).abs().flatten(1).amax(1)
        assert (difference > 0.1).all(), difference


def test_a_seeded_loader_repeats_itself():
    dataset = _arrays()
    first, again = _loader(dataset, seed=7), _loader(dataset, seed=7)
    for epoch in range(2):
        for a, b in zip(first.epoch(epoch), again.epoch(epoch), strict=True):
            assert torch.equal(a.index, b.index)
            assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
    other = next(iter(_loader(dataset, seed=8).epoch(0)))
    same_batch = next(iter(_loader(dataset, seed=7).epoch(0)))
    assert torch.equal(other.index, same_batch.index)  # the sampler's seed, not the loader's, orders them
    assert not torch.equal(other.view1, same_batch.view1)


def test_state_dict_resumes_the_views():
    dataset = _arrays()
    whole = _loader(dataset)
    list(whole.epoch(0))
    state = whole.state_dict()
    expected = list(whole.epoch(1))
    resumed = _loader(dataset, seed=123, view_mode="rela")
    resumed.load_state_dict(state)
    assert resumed.view_mode == "byol"
    for a, b in zip(expected, resumed.epoch(1), strict=True):
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)


def _framed(n: int, size: int = 32) -> ArrayImages:
    """Dark grey squares with a 2-pixel light frame: a view shows all four sides of the frame only if its
    crop is the whole image. Grey, so colour jitter keeps the frame lighter than the inside."""
    images = np.full((n, size, size, 3), 60, np.uint8)
    images[:, :2], images[:, -2:], images[:, :, :2], images[:, :, -2:] = 230, 230, 230, 230
    return ArrayImages(images, np.zeros(n), "framed")


def _shows_whole_frame(views: torch.Tensor) -> torch.Tensor:
    grey = views.float().mean(1)  # (B, S, S) in [0, 1]
    inside = grey[:, 8:-8, 8:-8].mean((1, 2))
    sides = torch.stack([grey[:, 0].mean(1), grey[:, -1].mean(1), grey[:, :, 0].mean(1), grey[:, :, -1].mean(1)], 1)
    return (sides > inside[:, None] + 0.2).all(1)


@pytest.mark.parametrize("view_mode", ["rela", "byol"])
def test_crops_honour_crop_min_scale(view_mode):
    """crop_min_scale 1.0: every crop is the whole image; 0.1: few are (in the mode it is given for)."""
    dataset = _framed(64)
    unit = Normalize((0, 0, 0), (1, 1, 1), CPU)
    # BYOL's second view solarizes (the frame turns dark): look at the first view only.

    def whole_frames(crop_min_scale) -> torch.Tensor:
        loader = _loader(dataset, batch_size=64, normalize=unit, view_mode=view_mode, image_size=32,
                         crop_min_scale=crop_min_scale)
        return torch.cat([_shows_whole_frame(batch.view1) for batch in loader.epoch(0)])

    assert whole_frames({view_mode: 1.0}).all()
    assert whole_frames({view_mode: 0.1}).float().mean() < 0.5
    other = "byol" if view_mode == "rela" else "rela"
    assert whole_frames({other: 1.0}).float().mean() < 0.5  # the other mode's minimum does not apply
