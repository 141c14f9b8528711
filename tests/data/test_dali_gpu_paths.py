"""DALI's GPU paths, as far as the CPU can check them: `--loader auto` picks DALI only for image files on
CUDA; the GPU decoder's arguments (fancy upsampling, memory hints) and none on the CPU twin; a failed
decode diagnosed on the pipelines' own device; a batch whose files are all skipped still makes a step
(black images under its indices), as in the torch loader, so ranks run equal step counts. The `gpu` tests
run the same on a GPU."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (the [dali] extra; a missing install must fail, not skip)

from rela.config import Config  # noqa: E402
from rela.data import factory  # noqa: E402
from rela.data.dali import DaliImageSource, DaliTrainLoader  # noqa: E402
from rela.data.dali import driver  # noqa: E402
from rela.data.dali.pipelines import decoder_args  # noqa: E402
from rela.data.datasets import ArrayImages, FileImages  # noqa: E402
from rela.data.loader import TorchImageSource, TorchTrainLoader  # noqa: E402
from rela.data.views import BYOL_VIEWS, Normalize  # noqa: E402

CPU = torch.device("cpu")
DEVICES = [pytest.param(CPU, id="cpu"), pytest.param(torch.device("cuda", 0), id="cuda", marks=pytest.mark.gpu)]
GPU_ONLY_ARGS = {"jpeg_fancy_upsampling", "device_memory_padding", "host_memory_padding", "hw_decoder_load"}


def _files(root: Path, n: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> FileImages:
    """n JPEGs (4:2:0, PIL's default), smooth colour fields so chroma upsampling matters."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(low).resize(size[::-1], Image.BICUBIC)
        rel = f"class_{i % 2}/{i:03d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, quality=90)
        files.append(rel)
    return FileImages(root, files, np.arange(n) % 2, "gpu-paths")


# ---- Which loader --------------------------------------------------------------------------------

@pytest.mark.parametrize("loader,device,kind,expected", [
    ("auto", "cuda", "files", True), ("auto", "cuda", "arrays", False),  # in memory: torch's batched views
    ("auto", "cpu", "files", False), ("auto", "cpu", "arrays", False),
    ("dali", "cuda", "arrays", True), ("dali", "cpu", "files", True),  # asked for: given
    ("torch", "cuda", "files", False),
])
def test_auto_picks_dali_only_for_image_files_on_cuda(tmp_path, loader, device, kind, expected):
    dataset = FileImages(tmp_path, ["a/0.jpg"], np.zeros(1), "f") if kind == "files" else \
        ArrayImages(np.zeros((1, 8, 8, 3), np.uint8), np.zeros(1), "a")
    cfg = dataclasses.replace(Config(), loader=loader)
    assert factory.choose_loader(cfg, torch.device(device), dataset) is expected


def test_create_loaders_passes_the_training_set_to_the_choice(monkeypatch):
    seen = []
    monkeypatch.setattr(factory, "choose_loader", lambda cfg, device, dataset=None: seen.append(dataset) or False)
    from rela.data.budget import BudgetSampler
    from rela.data.datasets import DatasetSplits

    arrays = ArrayImages(np.zeros((8, 8, 8, 3), np.uint8), np.arange(8) % 2, "a")
    splits = DatasetSplits(train=arrays, val=arrays, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3,
                           native_size=8)
    factory.create_loaders(dataclasses.replace(Config(), workers=0), splits, BudgetSampler(8, 1.0, 4, seed=0),
                           Normalize((0.5,) * 3, (0.25,) * 3, CPU), CPU, seed=0, method_views=BYOL_VIEWS)
    assert seen == [arrays]


# ---- The decoder -----------------------------------------------------------------------------------

def test_gpu_decoder_upsamples_like_pil_and_gets_memory_hints_the_cpu_twin_does_not():
    from nvidia.dali import backend

    gpu, cpu = decoder_args(on_gpu=True), decoder_args(on_gpu=False)
    assert gpu["device"] == "mixed" and cpu["device"] == "cpu"
    assert gpu["jpeg_fancy_upsampling"] is True and 0 < gpu["hw_decoder_load"] <= 1
    assert gpu["device_memory_padding"] > 16 << 20 and gpu["host_memory_padding"] > 8 << 20  # above defaults
    assert GPU_ONLY_ARGS <= set(gpu) and not GPU_ONLY_ARGS & set(cpu)
    assert {k: v for k, v in gpu.items() if k not in GPU_ONLY_ARGS | {"device"}} == \
        {k: v for k, v in cpu.items() if k != "device"}
    schema = backend.GetSchema("decoders__Image")  # a misspelt argument fails here, not on the first GPU
    assert all(schema.HasArgument(name) for name in set(gpu) - {"device"})


@pytest.mark.parametrize("device", DEVICES)
def test_decoded_jpeg_matches_pil(tmp_path, device):
    """4:2:0 JPEGs decoded by DALI (nvJPEG with fancy upsampling on the GPU) against PIL (libjpeg-turbo),
    at their own size so nothing is resized."""
    from PIL import Image

    dataset = _files(tmp_path, 6, size=(48, 48))
    source = DaliImageSource(dataset, device, num_threads=2)
    (images, index), = list(source.iterate([np.arange(6)], mode="train", size=48))
    assert index.tolist() == list(range(6))
    ours = images.cpu().permute(0, 2, 3, 1).numpy().astype(np.int16)
    pil = np.stack([np.asarray(Image.open(dataset.path(i)).convert("RGB")) for i in range(6)]).astype(np.int16)
    diff = np.abs(ours - pil)
    # IDCTs differ in the last bit between decoders; without fancy upsampling chroma edges differ by tens.
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


# ---- Diagnosing a failed decode ------------------------------------------------------------------

@pytest.mark.parametrize("device_id", [None, 0, 3])
def test_failed_decode_is_diagnosed_on_the_pipelines_device(tmp_path, monkeypatch, device_id):
    dataset = _files(tmp_path, 4)
    reader = driver.HostReader(dataset, skip_corrupt=True, num_threads=1, device_id=device_id)
    batch = reader.read(np.arange(4))
    asked = []

    def dali_decodes(encoded, device_id=None):  # PIL reads them all: the decoder at fault is DALI's
        asked.append(device_id)
        return np.array([True, False, True, True])

    monkeypatch.setattr(driver, "_dali_decodes", dali_decodes)
    kept = reader.drop_undecodable(batch, RuntimeError("nvjpeg failure"))
    assert asked == [device_id]
    assert kept.index.tolist() == [0, 2, 3] and reader.skipped == {1}


@pytest.mark.parametrize("device", DEVICES)
def test_single_file_decode_finds_the_file_the_decoder_fails_on(tmp_path, device):
    dataset = _files(tmp_path, 3)
    encoded = [np.fromfile(dataset.path(i), dtype=np.uint8) for i in range(3)]
    encoded[1] = encoded[1][: len(encoded[1]) // 3]  # cut short: the header reads, the decode fails
    device_id = None if device.type == "cpu" else device.index
    assert driver._dali_decodes(encoded, device_id).tolist() == [True, False, True]


# ---- A batch of only skipped files ---------------------------------------------------------------

class FixedBatches:
    """A sampler whose epoch is the given batches (so a test puts the bad files in one batch)."""

    def __init__(self, batches):
        self._batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.steps_per_epoch = len(self._batches)

    def batches(self, epoch: int, start_step: int = 0):
        return self._batches[start_step:]


def _break(dataset: FileImages, indices, how: str) -> None:
    for i in indices:
        path = dataset.path(i)
        if how == "garbage":  # no header: the host skips it before DALI sees it
            path.write_bytes(np.random.default_rng(i).integers(0, 256, 2000, dtype=np.uint8).tobytes())
        else:  # the header reads, PIL's and DALI's decode fail: found after the step failed in DALI
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_all_corrupt_batch_still_makes_a_step_of_black_images(tmp_path, how, device):
    dataset = _files(tmp_path, 12)
    _break(dataset, [4, 5, 6, 7], how)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalize = Normalize(mean, std, device)
    black = ((torch.zeros(3) - torch.tensor(mean)) / torch.tensor(std))[:, None, None]
    dali = DaliTrainLoader(dataset, FixedBatches(batches), image_size=16, normalize=normalize, seed=1,
                           device=device, num_threads=2, skip_corrupt=True)
    steps = list(dali.epoch(0))
    assert [b.index.tolist() for b in steps] == batches
    assert dali.skipped == {4, 5, 6, 7}
    for view in (steps[1].view1, steps[1].view2):
        torch.testing.assert_close(view.cpu(), black.expand_as(view.cpu()), rtol=0, atol=1e-5)
    assert all((b.view1.cpu() - black).abs().amax((1, 2, 3)).min() > 0.1 for b in (steps[0], steps[2]))
    assert steps[1].label.tolist() == dataset.labels[4:8].tolist()

    torch_loader = TorchTrainLoader(TorchImageSource(dataset, device, skip_corrupt=True), FixedBatches(batches),
                                    image_size=16, decode_size=18, normalize=normalize, seed=1)
    assert [b.index.tolist() for b in torch_loader.epoch(0)] == batches  # the same steps as the torch loader

    source = DaliImageSource(dataset, device, num_threads=2, skip_corrupt=True)
    made = list(source.iterate([np.array(b) for b in batches], size=16))
    assert [index.tolist() for _, index in made] == batches
    assert made[1][0].max() == 0 and all(images.max() > 0 for images, _ in (made[0], made[2]))


@pytest.mark.parametrize("device", DEVICES)
def test_a_rank_whose_whole_share_is_corrupt_runs_as_many_steps_as_the_others(tmp_path, device):
    """Two ranks' shares of one epoch: rank 1's files are all bad; both ranks still make every step."""
    from rela.data.budget import BudgetSampler

    dataset = _files(tmp_path, 16)
    normalize = Normalize((0.5,) * 3, (0.25,) * 3, device)
    ranks = [BudgetSampler(16, 1.0, 8, seed=2, rank=r, world_size=2) for r in range(2)]
    _break(dataset, sorted({int(i) for b in ranks[1].batches(0) for i in b}), "garbage")
    counts = []
    for sampler in ranks:
        loader = DaliTrainLoader(dataset, sampler, image_size=16, normalize=normalize, seed=1, device=device,
                                 num_threads=2, skip_corrupt=True)
        counts.append(sum(1 for _ in loader.epoch(0)))
    assert counts[0] == counts[1] == ranks[0].steps_per_epoch > 0
