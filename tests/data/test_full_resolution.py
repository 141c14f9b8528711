"""Files at their own aspect ratio: the torch loader's training crops are drawn within each image's own
frame (as torchvision's RandomResizedCrop and the DALI loader draw them), an absurdly elongated image is
refused as corrupt before any resize, and DALI's host reader reads a batch's files side by side and each
file's header once."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.data import datasets
from rela.data.budget import BudgetSampler
from rela.data.dali import driver
from rela.data.datasets import CorruptImageError, FileImages
from rela.data.loader import TorchImageSource, TorchTrainLoader
from rela.data.views import Normalize, ViewSpec
from rela.errors import RelaError

CPU = torch.device("cpu")
PLAIN = ViewSpec(flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)


def _save(root: Path, images: list[np.ndarray]) -> FileImages:
    from PIL import Image

    files = []
    for i, image in enumerate(images):
        rel = f"class_{i % 2}/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        files.append(rel)
    return FileImages(root, files, np.arange(len(images)) % 2, "full-resolution")


def _coordinates(height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3) whose red is the column (scaled to 0..255), green the row, blue 255: a view's
    red and green ranges say which part of the image it shows."""
    image = np.full((height, width, 3), 255, np.uint8)
    image[..., 0] = np.round(np.linspace(0, 255, width))[None, :]
    image[..., 1] = np.round(np.linspace(0, 255, height))[:, None]
    return image


def _plain_loader(dataset, *, batch_size: int, decode_size: int, image_size: int, skip_corrupt: bool = False,
                  seed: int = 0) -> TorchTrainLoader:
    sampler = BudgetSampler(len(dataset), 1.0, batch_size, seed=1)
    return TorchTrainLoader(TorchImageSource(dataset, CPU, skip_corrupt=skip_corrupt), sampler,
                            image_size=image_size, decode_size=decode_size,
                            normalize=Normalize((0, 0, 0), (1, 1, 1), CPU), seed=seed,
                            view_modes={"byol": (PLAIN, PLAIN)})


# ---- (a) crops in the image's own frame --------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 256), (256, 64)])
def test_training_crops_keep_the_images_own_aspect_ratio(tmp_path, height, width):
    """A 4:1 image (wide, or tall): every crop's width over height, measured in the original image's pixels,
    is within RandomResizedCrop's 3/4..4/3 (a little more for resampling). Squashed to a square first, the
    crops were about four times too wide (or tall). Blue is 255 everywhere: no black padding gets in."""
    dataset = _save(tmp_path / "images", [_coordinates(height, width)] * 16)
    loader = _plain_loader(dataset, batch_size=16, decode_size=32, image_size=16)
    ratios = []
    for epoch in range(4):
        for batch in loader.epoch(epoch):
            for view in (batch.view1, batch.view2):
                assert view[:, 2].min() > 0.99, "black padding was sampled"
                # Red and green move along the columns and rows of the view, as they did in the image.
                red_span = view[:, 0, :, -1].mean(1) - view[:, 0, :, 0].mean(1)
                green_span = view[:, 1, -1, :].mean(1) - view[:, 1, 0, :].mean(1)
                assert (red_span > 0).all() and (green_span > 0).all()
                ratios.append((red_span * (width - 1)) / (green_span * (height - 1)))
    ratios = torch.cat(ratios)
    assert len(ratios) == 128
    assert ratios.min() > 0.6 and ratios.max() < 1.7, (ratios.min(), ratios.max())


def test_a_file_smaller_than_the_decode_size_is_cropped_as_the_same_image_in_memory(tmp_path):
    """A 20 x 20 file decoded at 28 lies in the canvas as it is (never scaled up, its last row and column
    repeated past it): its crops are those of the same image held in memory, from the same draws, up to a
    rounding of the last bit."""
    from rela.data.datasets import ArrayImages

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(8)]
    files = _plain_loader(_save(tmp_path / "images", images), batch_size=8, decode_size=28, image_size=12)
    arrays = _plain_loader(ArrayImages(np.stack(images), np.arange(8) % 2, "same"), batch_size=8, decode_size=20,
                           image_size=12)
    for a, b in zip(files.epoch(0), arrays.epoch(0)):
        assert torch.equal(a.index, b.index)
        torch.testing.assert_close(a.view1, b.view1, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.view2, b.view2, atol=1e-6, rtol=0)


def test_a_crop_that_never_fits_is_the_central_window_within_the_ratio_range_in_both_loaders():
    """A 10 x 200 image: no crop of 8%..100% of its area with a ratio of 3/4..4/3 fits, so every crop is
    torchvision's fallback, the central 10 x 13 (not the whole 20:1 image), in the torch and DALI loaders."""
    from rela.data.dali.driver import draw_view_params
    from rela.data.views import random_crop_boxes

    n = 64
    boxes = random_crop_boxes(n, torch.full((n,), 10), torch.full((n,), 200), PLAIN, torch.Generator().manual_seed(0),
                              "cpu")
    assert boxes.tolist() == [[93.0, 0.0, 106.0, 10.0]] * n
    params = draw_view_params(PLAIN, np.tile([[10, 200]], (n, 1)), 16, np.random.default_rng(0))  # (y, x)
    assert params["crop_start"].tolist() == [[0.0, 93.0]] * n and params["crop_end"].tolist() == [[10.0, 106.0]] * n


# ---- (b) absurd aspect ratios ------------------------------------------------------------------------

@contextmanager
def _address_space_at_most(extra: int):
    """Allocations that would map more than `extra` bytes beyond what the process maps now fail
    (MemoryError) instead of taking the machine's memory."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        mapped = int(fh.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(hard, mapped + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _tree_with_a_line(root: Path) -> tuple[FileImages, int]:
    """Seven small images and a 1,000,000 x 1 PNG (3 kB on disk) at index 5."""
    from PIL import Image

    rng = np.random.default_rng(4)
    dataset = _save(root, [rng.integers(0, 256, (24, 30, 3), dtype=np.uint8) for _ in range(8)])
    Image.new("RGB", (1_000_000, 1), (90, 140, 200)).save(dataset.path(5))
    return dataset, 5


def test_an_absurdly_elongated_image_is_refused_in_one_line_naming_it(tmp_path):
    dataset, line = _tree_with_a_line(tmp_path / "images")
    path = str(dataset.path(line))
    source = TorchImageSource(dataset, CPU)
    with _address_space_at_most(1_500_000_000):  # resizing it for evaluation would take gigabytes
        for attempt in (lambda: source.load(torch.arange(8), size=32, crop_fraction=0.875),
                        lambda: list(_plain_loader(dataset, batch_size=4, decode_size=32, image_size=16).epoch(0))):
            with pytest.raises(RelaError) as err:  # the CLI prints a RelaError's message alone
                attempt()
            message = str(err.value)
            assert path in message and "elongated" in message and "--skip-corrupt" in message
            assert "\n" not in message
        with pytest.raises(CorruptImageError, match="elongated"):
            driver.HostReader(dataset, skip_corrupt=False, num_threads=2).read(np.arange(8))


def test_skip_corrupt_skips_an_absurdly_elongated_image(tmp_path):
    dataset, line = _tree_with_a_line(tmp_path / "images")
    with _address_space_at_most(1_500_000_000):
        loader = _plain_loader(dataset, batch_size=4, decode_size=32, image_size=16, skip_corrupt=True)
        seen = torch.cat([batch.index for batch in loader.epoch(0)]).tolist()
        assert sorted(seen) == [i for i in range(8) if i != line] and loader.skipped == {line}
        source = TorchImageSource(dataset, CPU, skip_corrupt=True)
        loaded = source.load(torch.arange(8), size=32, crop_fraction=0.875)
        assert loaded[line].max() == 0 and source.skipped == {line}
        reader = driver.HostReader(dataset, skip_corrupt=True, num_threads=2)
        assert reader.submit(np.arange(8)).result().index.tolist() == [i for i in range(8) if i != line]
        assert reader.skipped == {line}


def test_decode_refuses_beyond_the_aspect_limit_only(tmp_path):
    from PIL import Image

    limit = datasets.MAX_ASPECT_RATIO
    Image.new("RGB", (limit * 2, 2)).save(tmp_path / "at.png")
    Image.new("RGB", (2, limit * 2 + 1)).save(tmp_path / "over.png")
    assert datasets.decode_image(tmp_path / "at.png").shape == (2, limit * 2, 3)
    with pytest.raises(CorruptImageError, match="elongated"):
        datasets.decode_image(tmp_path / "over.png")


# ---- (c) DALI's host reader --------------------------------------------------------------------------

class _MeetingFiles(FileImages):
    """FileImages whose `path` waits until `parties` threads ask for one at the same time."""

    def __init__(self, dataset: FileImages, parties: int):
        super().__init__(dataset.root, dataset.files, dataset.labels, dataset.name)
        self.barrier = threading.Barrier(parties, timeout=5)

    def path(self, index: int) -> Path:
        self.barrier.wait()
        return super().path(index)


def test_the_dali_reader_reads_a_batchs_files_on_as_many_threads_as_asked(tmp_path):
    """Six files of one batch, six threads: all six are read at once (the reader used at most four threads,
    and one per batch)."""
    rng = np.random.default_rng(5)
    dataset = _MeetingFiles(_save(tmp_path / "images", [rng.integers(0, 256, (8, 8, 3), np.uint8)] * 6), 6)
    reader = driver.HostReader(dataset, skip_corrupt=False, num_threads=6)
    batch = reader.submit(np.arange(6)).result()
    assert batch.index.tolist() == list(range(6)) and batch.sizes.tolist() == [[8, 8]] * 6


def test_the_dali_reader_reads_each_header_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    dataset = _save(tmp_path / "images", [rng.integers(0, 256, (8 + i, 12, 3), np.uint8) for i in range(6)])
    from PIL import Image

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    reader = driver.HostReader(dataset, skip_corrupt=False, num_threads=2)
    for epoch in range(3):
        batch = reader.submit(np.arange(6)).result()
        assert batch.sizes.tolist() == [[8 + i, 12] for i in range(6)]
        assert all(np.array_equal(data, np.fromfile(dataset.path(i), np.uint8)) for i, data in enumerate(batch.data))
    assert len(opened) == 6
