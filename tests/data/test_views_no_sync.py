"""The hue rotation's YIQ matrices are made once per device and dtype (no host sync per view), and the
views are what the per-view construction gave, bit for bit, on fixed seeds."""
from __future__ import annotations

import math

import pytest
import torch

from rela.data import views
from rela.data.views import BYOL_VIEWS, RELA_VIEWS, augment_batch


def _rotate_hue_per_view(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """The implementation before the cache (a copy): matrices built and inverted on x's device per call."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = turns * 2 * math.pi
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq).clamp_(0, 1)


def _views(images, specs, seed):
    gen = torch.Generator(device=images.device).manual_seed(seed)
    return [augment_batch(images, spec, 24, gen) for spec in specs for _ in range(3)]


def _images(n, h, w, device="cpu"):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n * 1000 + h)).to(device)


@pytest.mark.parametrize("n,h,w", [(1, 24, 24), (5, 31, 40), (16, 48, 32)])
@pytest.mark.parametrize("specs", [BYOL_VIEWS, RELA_VIEWS], ids=["byol", "rela"])
def test_views_equal_the_per_view_matrices_bit_for_bit(n, h, w, specs, monkeypatch):
    images = _images(n, h, w)
    ours = _views(images, specs, seed=7)
    monkeypatch.setattr(views, "_rotate_hue", _rotate_hue_per_view)
    reference = _views(images, specs, seed=7)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_hue_rotation_equals_the_per_view_matrices_for_every_angle():
    x = torch.rand(64, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    turns = torch.linspace(-0.5, 0.5, 64)
    assert torch.equal(views._rotate_hue(x, turns), _rotate_hue_per_view(x, turns))


def test_matrices_are_made_once_per_device_and_dtype(monkeypatch):
    x = torch.rand(4, 3, 6, 6)
    views._rotate_hue(x, torch.zeros(4))
    first = views._yiq_matrices(x.device, x.dtype)

    def no_inverse(*args, **kwargs):
        raise AssertionError("linalg.inv called again for a device and dtype already seen")

    monkeypatch.setattr(torch.linalg, "inv", no_inverse)
    views._rotate_hue(x, torch.full((4,), 0.1))
    gen = torch.Generator().manual_seed(0)
    augment_batch(_images(4, 20, 20), BYOL_VIEWS[0], 16, gen)
    again = views._yiq_matrices(x.device, x.dtype)
    assert all(a is b for a, b in zip(first, again))


@pytest.mark.gpu
def test_cuda_views_match_the_per_view_matrices_and_keep_the_cache_on_the_device(monkeypatch):
    images = _images(8, 40, 36, "cuda")
    ours = _views(images, BYOL_VIEWS, seed=11)
    to_yiq, from_yiq = views._yiq_matrices(images.device, torch.float32)
    assert to_yiq.is_cuda and from_yiq.is_cuda
    monkeypatch.setattr(views, "_rotate_hue", _rotate_hue_per_view)
    reference = _views(images, BYOL_VIEWS, seed=11)
    for a, b in zip(ours, reference):  # the inverse from LAPACK vs cuSOLVER: last bits may differ
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_torch_train_loader_does_not_sync_the_host_after_its_first_batch():
    """In-memory images on CUDA: indices go through pinned memory, views draw on the device; a
    synchronising call raises under set_sync_debug_mode('error')."""
    import numpy as np

    from rela.data.budget import BudgetSampler
    from rela.data.datasets import ArrayImages
    from rela.data.loader import TorchImageSource, TorchTrainLoader
    from rela.data.views import Normalize

    cuda = torch.device("cuda")
    data = ArrayImages(np.random.default_rng(0).integers(0, 256, (64, 24, 24, 3), dtype=np.uint8),
                       np.arange(64) % 5, "noise")
    loader = TorchTrainLoader(TorchImageSource(data, cuda), BudgetSampler(64, 1.0, 16, seed=0), image_size=16,
                              decode_size=24, normalize=Normalize((0.5,) * 3, (0.25,) * 3, cuda), seed=1)
    batches = loader.epoch(0)
    next(batches)  # the first batch makes the YIQ matrices (one copy each)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [batch.view1.sum() for batch in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 3
