"""The DALI loaders on the CPU twin (device_id=None): indices, epoch coverage, view statistics against the
torch loader, bad files, and a training run with --loader dali. The view switch at a step is tested for
both loaders in test_loader_interfaces.py."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (the [dali] extra; a missing install must fail, not skip)

from rela.data.budget import BudgetSampler  # noqa: E402
from rela.data.dali import DaliImageSource, DaliTrainLoader, dali_available  # noqa: E402
from rela.data.dali.driver import draw_view_params, hue_degrees  # noqa: E402
from rela.data.dali.pipelines import ARRAYS, VIEW_INPUTS, train_pipeline  # noqa: E402
from rela.data.datasets import ArrayImages, CorruptImageError, FileImages, decode_image  # noqa: E402
from rela.data.loader import TorchImageSource, TorchTrainLoader, _pil_square  # noqa: E402
from rela.data.views import (BYOL_VIEWS, Normalize, ViewSpec, _gaussian_blur, _grey, _rotate_hue,  # noqa: E402
                             blur_kernel_size)

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# Everything off but a crop of the whole image: what is left is the image itself, resized.
PLAIN = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                 blur_p=0.0, solarize_p=0.0)


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sinusoids of random frequency and phase per channel: natural-ish, survives JPEG and resizing."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    freq, phase = rng.uniform(1, 4, 3), rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(2 * np.pi * freq[c] * (xx + 0.7 * (c + 1) * yy) + phase[c]) for c in range(3)]
    return np.stack(channels, -1).round().astype(np.uint8)


def _write_files(root: Path, images: list[np.ndarray], labels: list[int], formats: list[str]) -> FileImages:
    """class_<label>/<i>.<ext>; `formats` per image: 'jpg', 'png', 'png-P', 'png-L', 'png-RGBA'."""
    from PIL import Image

    files = []
    for i, (image, label, fmt) in enumerate(zip(images, labels, formats)):
        pil = Image.fromarray(image)
        kind, _, mode = fmt.partition("-")
        if mode:
            pil = pil.convert(mode)
        rel = f"class_{label}/{i:03d}.{kind}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pil.save(root / rel, quality=95)
        files.append(rel)
    return FileImages(root, files, np.asarray(labels), "dali-test")


@pytest.fixture
def dali_smooth_files(tmp_path) -> FileImages:
    """36 images of sizes 50x40 .. 120x90, JPEG and PNG (RGB, palette, grey, RGBA), 3 classes."""
    rng = np.random.default_rng(0)
    images = [_smooth_image(rng, int(rng.integers(40, 91)), int(rng.integers(50, 121))) for _ in range(36)]
    formats = ["jpg", "jpg", "png", "jpg", "png-P", "jpg", "png-L", "jpg", "png-RGBA"] * 4
    return _write_files(tmp_path / "smooth", images, [i % 3 for i in range(36)], formats)


def _colour(i: int) -> tuple[int, int, int]:
    """A colour per index, 50 levels from any other index's in some channel (JPEG moves a few)."""
    return 20 + 50 * (i % 5), 20 + 50 * (i // 5 % 5), 20 + 50 * (i // 25 % 5)


@pytest.fixture
def dali_solid_files(tmp_path) -> FileImages:
    """40 solid-colour images, one colour per index, sizes varying, every fourth a PNG."""
    rng = np.random.default_rng(1)
    images = [np.full((int(rng.integers(40, 91)), int(rng.integers(50, 121)), 3), _colour(i), np.uint8)
              for i in range(40)]
    return _write_files(tmp_path / "solid", images, [i % 4 for i in range(40)],
                        ["png" if i % 4 == 3 else "jpg" for i in range(40)])


def _solid_arrays(n: int, size: int = 24) -> ArrayImages:
    images = np.stack([np.full((size, size, 3), _colour(i), np.uint8) for i in range(n)])
    return ArrayImages(images, np.arange(n) % 4, "solid")


def _unit_normalize(**kwargs) -> Normalize:
    return Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), CPU, **kwargs)


def _loader(dataset, *, batch_size: int = 8, budget: float = 1.0, rank: int = 0, world: int = 1,
            views: tuple[ViewSpec, ViewSpec] | None = None, **kwargs) -> DaliTrainLoader:
    sampler = BudgetSampler(len(dataset), budget, batch_size, seed=3, rank=rank, world_size=world)
    kwargs = {"image_size": 16, "normalize": _unit_normalize(), "seed": 5, "device": CPU, "num_threads": 2,
              **kwargs}
    loader = DaliTrainLoader(dataset, sampler, **kwargs)
    if views is not None:
        loader.views = views  # a test-only pair; set_view_mode would restore a named pair
    return loader


def _decoded_index(view: torch.Tensor) -> int:
    """The index whose colour a plain view of a solid image shows (view: (3, S, S) in [0, 1])."""
    colour = view.float().mean((1, 2)).numpy() * 255
    distances = [np.abs(colour - np.array(_colour(i))).max() for i in range(125)]
    assert min(distances) < 8, colour  # a plain view keeps the colour
    return int(np.argmin(distances))


def test_dali_is_available():
    assert dali_available()


# ---- Evaluation: resize + center crop --------------------------------------------------------------

@pytest.mark.parametrize("size,crop_fraction", [(32, 0.875), (48, 1.0), (24, 0.5)])
def test_eval_center_crop_matches_pil_reference(dali_smooth_files, size, crop_fraction):
    """Each index's output is the torch loader's PIL resize + center crop of that file, to a level or two."""
    source = DaliImageSource(dali_smooth_files, CPU, num_threads=2)
    n = len(dali_smooth_files)
    batches = [np.arange(s, min(s + 10, n)) for s in range(0, n, 10)]
    outputs = list(source.iterate(batches, mode="eval", size=size, crop_fraction=crop_fraction))
    images = torch.cat([o[0] for o in outputs])
    index = torch.cat([o[1] for o in outputs])
    assert images.dtype == torch.uint8 and images.shape == (n, 3, size, size)
    assert index.dtype == torch.int64 and index.tolist() == list(range(n))
    refs = np.stack([_pil_square(decode_image(dali_smooth_files.path(i)), size, crop_fraction) for i in range(n)])
    diff = np.abs(images.numpy().astype(np.float64) - refs)
    assert diff.mean((1, 2, 3)).max() < 0.5 and diff.max() <= 4
    # and no other image is as close: the index names the right file
    cross = np.abs(images.numpy()[:, None].astype(np.float64) - refs[None]).mean((2, 3, 4))
    assert (cross.argmin(1) == np.arange(n)).all()


def test_eval_shards_cover_every_index_once_in_order(dali_smooth_files):
    """Two ranks' contiguous blocks (as eval/features.py shards), batches of 7 with a short tail."""
    n = len(dali_smooth_files)
    bounds = np.linspace(0, n, 3).astype(int)
    seen = []
    for rank in range(2):
        mine = np.arange(bounds[rank], bounds[rank + 1])
        batches = [mine[s: s + 7] for s in range(0, len(mine), 7)]
        source = DaliImageSource(dali_smooth_files, CPU, num_threads=2)
        got = [index for _, index in source.iterate(batches, mode="eval", size=16, crop_fraction=0.875)]
        assert [len(g) for g in got] == [len(b) for b in batches]
        seen.extend(torch.cat(got).tolist())
    assert seen == list(range(n))


def test_eval_in_memory_matches_torch_image_source():
    rng = np.random.default_rng(2)
    images = np.stack([_smooth_image(rng, 40, 40) for _ in range(12)])
    dataset = ArrayImages(images, np.zeros(12), "arrays")
    batches = [np.arange(0, 5), np.arange(5, 12)]
    for mode, size, crop_fraction in [("eval", 32, 0.875), ("eval", 40, 1.0), ("train", 20, 0.875)]:
        got = list(DaliImageSource(dataset, CPU, num_threads=1).iterate(batches, mode=mode, size=size,
                                                                        crop_fraction=crop_fraction))
        ref = list(TorchImageSource(dataset, CPU).iterate(batches, mode=mode, size=size, crop_fraction=crop_fraction))
        for (a, ia), (b, ib) in zip(got, ref):
            assert ia.tolist() == ib.tolist() and a.shape == b.shape
            assert (a.int() - b.int()).abs().float().mean() < 0.6 and (a.int() - b.int()).abs().max() <= 3
    # as stored: no resampling at all
    same, _ = next(DaliImageSource(dataset, CPU).iterate(batches, mode="train", size=99))
    assert torch.equal(same, torch.from_numpy(images[:5]).permute(0, 3, 1, 2))


def test_load_returns_rows_in_the_order_asked(dali_smooth_files):
    source = DaliImageSource(dali_smooth_files, CPU, num_threads=2)
    order = torch.tensor([5, 0, 33, 5, 12])
    loaded = source.load(order, size=24, crop_fraction=0.875)
    in_order, _ = next(source.iterate([np.arange(len(dali_smooth_files))], size=24, crop_fraction=0.875))
    assert torch.equal(loaded, in_order[order])


# ---- Training: indices, coverage, resume, output format --------------------------------------------

@pytest.mark.parametrize("kind", ["files", "arrays"])
def test_train_views_carry_their_index_and_label(dali_solid_files, kind):
    dataset = dali_solid_files if kind == "files" else _solid_arrays(40)
    loader = _loader(dataset, batch_size=6, views=(PLAIN, PLAIN))
    for epoch in range(2):
        count = 0
        for batch in loader.epoch(epoch):
            for k, index in enumerate(batch.index.tolist()):
                assert _decoded_index(batch.view1[k]) == index == _decoded_index(batch.view2[k])
            assert torch.equal(batch.label, torch.as_tensor(dataset.labels)[batch.index])
            count += len(batch.index)
        assert count == loader.sampler.subset_size == 36  # 40 in batches of 6: the short last one dropped


def test_each_subset_index_once_per_epoch_over_two_ranks(dali_solid_files):
    """budget 0.7 of 40 = 28 per epoch, 14 per rank in batches of 4: 12 per rank (the short last batch is
    dropped), 24 per epoch."""
    loaders = [_loader(dali_solid_files, batch_size=4, budget=0.7, rank=r, world=2) for r in range(2)]
    for epoch in range(3):
        per_rank = []
        for loader in loaders:
            batches = list(loader.epoch(epoch))
            assert len(batches) == loader.steps_per_epoch == 3
            assert [len(b.index) for b in batches] == [4, 4, 4]
            per_rank.append(torch.cat([b.index for b in batches]).tolist())
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) == 24
        assert sorted(seen) == sorted(loaders[0].sampler.epoch_subset(epoch).tolist())
        assert per_rank[0] == loaders[0].sampler.rank_indices(epoch).tolist()  # the sampler's order, exactly


def test_resume_mid_epoch_gives_the_same_batches():
    rng = np.random.default_rng(4)
    dataset = ArrayImages(np.stack([_smooth_image(rng, 24, 24) for _ in range(40)]), np.zeros(40), "smooth")
    whole = list(_loader(dataset).epoch(1))
    resumed_loader = _loader(dataset, view_mode="rela")
    resumed_loader.load_state_dict(_loader(dataset).state_dict())
    assert resumed_loader.view_mode == "byol"
    resumed = list(resumed_loader.epoch(1, start_step=2))
    assert len(resumed) == len(whole) - 2
    for a, b in zip(whole[2:], resumed):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
    # and another epoch draws other views
    assert not torch.equal(whole[0].view1, next(iter(_loader(dataset).epoch(2))).view1)


def test_abandoned_epoch_leaves_nothing_behind():
    """An epoch left after one batch has steps in flight; the next epoch must not yield them."""
    loader = _loader(_solid_arrays(40), batch_size=4, views=(PLAIN, PLAIN), prefetch=3)
    abandoned = iter(loader.epoch(0))
    next(abandoned)
    batches = list(loader.epoch(1))
    assert torch.cat([b.index for b in batches]).tolist() == loader.sampler.rank_indices(1).tolist()
    assert all(_decoded_index(b.view1[k]) == i for b in batches for k, i in enumerate(b.index.tolist()))
    with pytest.raises(RuntimeError, match="superseded"):
        next(abandoned)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float16, True),
                                                 (torch.bfloat16, True), (torch.float32, True)])
def test_output_dtype_and_layout_follow_normalize(dali_smooth_files, dtype, channels_last):
    normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CPU, dtype=dtype,
                          channels_last=channels_last)
    batch = next(iter(_loader(dali_smooth_files, normalize=normalize, image_size=24).epoch(0)))
    for view in (batch.view1, batch.view2):
        assert view.shape == (8, 3, 24, 24) and view.dtype == dtype
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert view.is_contiguous(memory_format=memory_format)
        assert torch.isfinite(view.float()).all() and view.float().abs().max() < 5
    assert batch.index.dtype == batch.label.dtype == torch.int64


# ---- Augmentations: the graph against views.py, statistics against the torch loader ----------------

def test_graph_matches_torch_reference_for_fixed_params():
    """Fed the same per-sample choices, the DALI graph computes views.augment_batch's colour ops, blur,
    solarize and flip (crop: the whole image at its own size, so resampling drops out). fn.hsv does
    saturation and hue in one pass, where the reference clamps in between: they differ where a
    saturation above 1 leaves the range before a hue turn, so that case is left out."""
    n, size = 6, 20
    rng = np.random.default_rng(5)
    images = np.stack([_smooth_image(rng, size, size) for _ in range(n)])
    params = {
        "crop_start": np.zeros((n, 2), np.float32), "crop_end": np.full((n, 2), size, np.float32),
        "flip": np.array([0, 1, 0, 1, 0, 1], np.int32),
        "brightness": np.array([1.0, 1.3, 0.7, 1.0, 1.1, 0.9], np.float32),
        "contrast": np.array([1.0, 0.8, 1.2, 1.0, 0.9, 1.1], np.float32),
        "saturation": np.array([1.0, 0.9, 0.9, 0.0, 0.8, 1.1], np.float32),
        "hue": hue_degrees(np.array([0.0, 0.05, -0.08, 0.0, 0.03, 0.0])).astype(np.float32),
        "blur_window": np.array([1, 5, 1, 5, 1, 1], np.int32),
        "blur_sigma": np.array([1.0, 1.5, 1.0, 0.7, 1.0, 1.0], np.float32),
        "solarize": np.array([0, 0, 1, 0, 1, 0], np.float32),
    }
    assert set(params) == set(VIEW_INPUTS)
    pipe = train_pipeline(ARRAYS, batch_size=n, num_threads=1, device_id=None, size=size, mean=(0, 0, 0),
                          std=(1, 1, 1), half=False, channels_last=False)
    pipe.build()
    pipe.feed_input(ARRAYS, images)
    for view in ("view1_", "view2_"):
        for name, value in params.items():
            pipe.feed_input(view + name, value)
    pipe.schedule_run()
    got = torch.from_numpy(np.array(pipe.outputs()[0].as_tensor())).double()

    def per_sample(name):
        return torch.from_numpy(params[name]).double()

    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = (x * per_sample("brightness")[:, None, None, None]).clamp(0, 1)
    c = per_sample("contrast")[:, None, None, None]
    x = (c * x + (1 - c) * _grey(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    s = per_sample("saturation")[:, None, None, None]
    x = (s * x + (1 - s) * _grey(x)).clamp(0, 1)
    x = _rotate_hue(x, torch.tensor([0.0, 0.05, -0.08, 0.0, 0.03, 0.0], dtype=torch.float64))
    blurred = torch.stack([_gaussian_blur(x[i: i + 1], per_sample("blur_sigma")[i: i + 1], 5)[0]
                           for i in range(n)])
    x = torch.where(torch.from_numpy(params["blur_window"] > 1)[:, None, None, None], blurred, x)
    x = torch.where((per_sample("solarize")[:, None, None, None] > 0) & (x >= 0.5), 1 - x, x)
    x = torch.where(torch.from_numpy(params["flip"] > 0)[:, None, None, None], x.flip(-1), x)
    assert (got - x).abs().max() < 0.005


def _smooth_arrays(n: int, size: int, seed: int) -> ArrayImages:
    low = torch.from_numpy(np.random.default_rng(seed).random((n, 3, 6, 6)).astype(np.float32))
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ArrayImages(images, np.zeros(n), "smooth-noise")


@pytest.mark.parametrize("mode", ["byol", "rela"])
def test_view_statistics_agree_with_torch_loader(mode):
    """Per view and channel, the normalised mean and std of DALI's views are the torch loader's."""
    dataset = _smooth_arrays(384, 40, seed=6)
    normalize = Normalize((0.5, 0.45, 0.4), (0.25, 0.25, 0.25), CPU)

    def moments(loader):
        views = [[], []]
        for epoch in range(2):
            for batch in loader.epoch(epoch):
                views[0].append(batch.view1)
                views[1].append(batch.view2)
        return [(torch.cat(v).mean((0, 2, 3)), torch.cat(v).std((0, 2, 3))) for v in views]

    sampler = BudgetSampler(len(dataset), 1.0, 64, seed=0)
    dali = moments(DaliTrainLoader(dataset, sampler, image_size=32, normalize=normalize, seed=1, device=CPU,
                                   view_mode=mode, num_threads=2))
    torch_loader = TorchTrainLoader(TorchImageSource(dataset, CPU), sampler, image_size=32, decode_size=40,
                                    normalize=normalize, seed=1, view_mode=mode)
    reference = moments(torch_loader)
    for (mean, std), (ref_mean, ref_std) in zip(dali, reference):
        assert (mean - ref_mean).abs().max() < 0.06, (mean, ref_mean)
        assert ((std - ref_std).abs() / ref_std).max() < 0.06, (std, ref_std)
    if mode == "byol":  # solarize (view 2 only) darkens: the test sees the views' asymmetry
        assert (dali[1][0] - dali[0][0]).max() < -0.08


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


def _byol_counts(images: np.ndarray, detect, epochs: int = 2) -> tuple[int, int, int]:
    """How many samples of view 1 and view 2 `detect` (on the views in [0, 1]) flags, and of how many."""
    loader = _loader(ArrayImages(images, np.zeros(len(images)), "designed"), batch_size=64, view_mode="byol")
    hits, n = [0, 0], 0
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):
            hits[0] += int(detect(batch.view1).sum())
            hits[1] += int(detect(batch.view2).sum())
            n += len(batch.index)
    return hits[0], hits[1], n


def test_flip_frequency_follows_byol_specs():
    """A grey ramp brightening left to right: every op but flip (and solarize, view 2 only) keeps it
    increasing, whatever the crop, so its direction tells a flipped view."""
    ramp = np.linspace(15, 115, 24).round().astype(np.uint8)
    images = np.broadcast_to(ramp[None, None, :, None], (256, 24, 24, 3)).copy()

    def flipped(view):
        luma = _grey(view.float())[:, 0]
        return luma[..., :4].mean((1, 2)) > luma[..., -4:].mean((1, 2))

    view1, _, n = _byol_counts(images, flipped)
    assert _within_binomial(view1, n, BYOL_VIEWS[0].flip_p)


def test_grayscale_frequency_follows_byol_specs():
    """A solid strong colour stays coloured under jitter and blur; only grayscale makes it grey."""
    images = np.broadcast_to(np.array([200, 40, 110], np.uint8), (256, 24, 24, 3)).copy()

    def grey(view):
        return (view.float().amax(1) - view.float().amin(1)).amax((1, 2)) < 0.02

    view1, _, n = _byol_counts(images, grey)
    assert _within_binomial(view1, n, BYOL_VIEWS[0].grayscale_p)


def test_solarize_frequency_follows_byol_specs():
    """A solid light grey stays above 0.5 under every op (brightness >= 0.6; contrast, colour and blur
    leave a solid grey as it is) but solarize, which takes every pixel to <= 0.5."""
    images = np.full((256, 24, 24, 3), 245, np.uint8)

    def solarized(view):
        return view.float().amax((1, 2, 3)) <= 0.5

    view1, view2, n = _byol_counts(images, solarized)
    assert view1 == 0 and _within_binomial(view2, n, BYOL_VIEWS[1].solarize_p)


def test_draws_follow_each_view_spec():
    """The host draws every choice: their frequencies are the specs' for both BYOL views."""
    rng = np.random.default_rng(7)
    sizes = np.tile([[90, 120]], (4000, 1))
    for spec in BYOL_VIEWS:
        p = draw_view_params(spec, sizes, 64, rng)
        n = len(sizes)
        assert _within_binomial(int((p["saturation"] == 0).sum()), n, spec.grayscale_p)
        blurred = p["blur_window"] > 1
        assert _within_binomial(int(blurred.sum()), n, spec.blur_p)
        # odd windows, cut at 3 sigma and never wider than the spec's kernel
        window, sigma = p["blur_window"][blurred], p["blur_sigma"][blurred]
        assert (window % 2 == 1).all() and (window <= blur_kernel_size(64)).all()
        assert (window >= np.minimum(blur_kernel_size(64), 6 * sigma + 1)).all()
        assert _within_binomial(int(p["solarize"].sum()), n, spec.solarize_p)
        assert _within_binomial(int(p["flip"].sum()), n, spec.flip_p)
        jittered = p["brightness"] != 1
        assert _within_binomial(int(jittered.sum()), n, spec.jitter_p)
        area = np.prod(p["crop_end"] - p["crop_start"], 1) / (90 * 120)
        assert area.min() >= spec.crop_scale[0] * 0.9 and area.max() <= 1.0
        assert (p["crop_start"] >= 0).all() and (p["crop_end"] <= [90, 120]).all()


# ---- Bad input -------------------------------------------------------------------------------------

def _corrupt_tree(tmp_path: Path) -> tuple[FileImages, dict[str, int]]:
    """24 good images and four bad ones: random bytes, a JPEG cut short (its header reads fine, so only
    the decoder finds out), a GIF under a .jpg name (a format DALI does not decode) and a 1-bit TIFF
    (PIL reads it, DALI's decoder does not)."""
    from PIL import Image

    rng = np.random.default_rng(8)
    images = [_smooth_image(rng, 40, 50) for _ in range(28)]
    bad = {"garbage": 4, "truncated": 13, "gif": 21, "tiff_1bit": 9}
    formats = ["tif-1" if i == bad["tiff_1bit"] else "jpg" for i in range(28)]
    dataset = _write_files(tmp_path / "bad", images, [i % 3 for i in range(28)], formats)
    dataset.path(bad["garbage"]).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    jpeg = dataset.path(bad["truncated"]).read_bytes()
    dataset.path(bad["truncated"]).write_bytes(jpeg[: len(jpeg) // 2])
    buffer = io.BytesIO()
    Image.fromarray(images[bad["gif"]]).save(buffer, format="GIF")
    dataset.path(bad["gif"]).write_bytes(buffer.getvalue())
    return dataset, bad


@pytest.mark.parametrize("which", ["garbage", "truncated", "gif", "tiff_1bit"])
def test_corrupt_file_raises_naming_it(tmp_path, which):
    dataset, bad = _corrupt_tree(tmp_path)
    only = np.array([i for i in range(len(dataset)) if i == bad[which] or i not in bad.values()])
    path = str(dataset.path(bad[which]))
    source = DaliImageSource(dataset, CPU, num_threads=2)
    with pytest.raises(CorruptImageError, match="--skip-corrupt") as err:
        list(source.iterate([only[s: s + 5] for s in range(0, len(only), 5)], size=16))
    assert path in str(err.value)
    train_set = FileImages(dataset.root, [dataset.files[i] for i in only], dataset.labels[only], "bad")
    with pytest.raises(CorruptImageError) as err:
        for _ in _loader(train_set, batch_size=5).epoch(0):
            pass
    assert path in str(err.value)
    if which in ("gif", "tiff_1bit"):  # files the torch loader reads: the message says so
        assert "--loader torch" in str(err.value)


def test_skip_corrupt_drops_and_counts_bad_files(tmp_path):
    dataset, bad = _corrupt_tree(tmp_path)
    good = sorted(set(range(len(dataset))) - set(bad.values()))
    loader = _loader(dataset, batch_size=7, skip_corrupt=True)  # 28 files: whole batches, every file read
    for epoch in range(2):
        seen = torch.cat([b.index for b in loader.epoch(epoch)]).tolist()
        assert sorted(seen) == good
    assert loader.skipped == set(bad.values())

    source = DaliImageSource(dataset, CPU, num_threads=2, skip_corrupt=True)
    batches = [np.arange(s, min(s + 6, len(dataset))) for s in range(0, len(dataset), 6)]
    seen = torch.cat([index for _, index in source.iterate(batches, size=16)]).tolist()
    assert seen == good and source.skipped == set(bad.values())
    loaded = source.load(torch.arange(len(dataset)), size=16, crop_fraction=0.875)
    assert all(loaded[i].max() == 0 for i in bad.values())
    assert all(loaded[i].max() > 0 for i in good)


# ---- End to end ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_run_with_dali_loader_finishes(tmp_path, device):
    rng = np.random.default_rng(9)
    root = tmp_path / "tree"
    images = [_smooth_image(rng, int(rng.integers(40, 91)), int(rng.integers(50, 121))) for _ in range(30)]
    _write_files(root, images, [i % 3 for i in range(30)], ["png" if i % 5 == 0 else "jpg" for i in range(30)])
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "rela.train", "--dataset", "imagefolder", "--data", str(root), "--loader", "dali",
         "--arch", "small_resnet", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--out", str(out),
         "--bank-dir", str(tmp_path / "banks"), "--probe-epochs", "5", "--workers", "2", "--no-progress",
         "--device", device],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loader dali" in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] > 0 and summary["skipped_corrupt"] == 0
