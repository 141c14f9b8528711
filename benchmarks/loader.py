"""How fast are two-view 224 px BYOL samples made from JPEG files: DALI, the torchvision baseline, the torch loader?

    python benchmarks/loader.py [--out DIR] [--quick] [--images N] [--device cuda|cpu]

One run generates an ImageFolder tree of ImageNet-like JPEGs (500x375, quality 90, multi-scale noise
with a photo-like spectrum, so they compress and decode like photos) in a temporary folder
and times, on the same files and the same budget sampler:
  dali         rela.data.dali.DaliTrainLoader: nvJPEG decode and both views on the GPU; on the CPU its
               CPU twin (the same graph on CPU operators, as many threads as cores)
  torchvision  the usual baseline: a DataLoader whose workers (as many as cores) decode with PIL and
               run torchvision.transforms for both BYOL views, batches moved to the device
  torch        rela.data.loader.TorchTrainLoader: workers decode to a square, views made on the device
Each repeat takes a few batches (a fresh epoch when one runs out), enough to drain what a loader keeps
buffered, so the median is the rate batches are made at, not the rate a buffer empties at.
On a GPU it also trains the trainer's own BYOL step (rela.step.train_step on the networks of the imagenet
preset: ResNet-50, bf16, channels_last, compiled) on each loader's batches and reports the fraction of wall
time spent waiting for data (`--wait-model none` skips it). Reports, never asserts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput_steps import TrainerStep, fused_skip_reason, setup_from_config  # noqa: E402
from benchmarks.timing import environment, print_table, time_fn, write_json  # noqa: E402
from rela.data.budget import BudgetSampler  # noqa: E402
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD, FileImages  # noqa: E402
from rela.data.loader import TorchImageSource, TorchTrainLoader, TrainBatch, default_decode_size  # noqa: E402
from rela.data.views import BYOL_VIEWS, Normalize, ViewSpec, blur_kernel_size  # noqa: E402
from rela.options import resolve_config  # noqa: E402

IMAGE_SIZE = 224
WIDTH, HEIGHT = 500, 375  # ImageNet's typical landscape frame


def write_jpeg_tree(root: Path, n: int, *, classes: int = 10, seed: int = 0) -> FileImages:
    """n JPEGs, 500x375, quality 90, about 95 KiB each (ImageNet's are about 110). Content: a noise
    pyramid, each level upsampled and added to with fresh noise at 0.85x the amplitude of the coarser one,
    which gives the 1/f-like spectrum of photos; colours partly correlated and a cast per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    cast = rng.uniform(-30, 30, (classes, 3, 1, 1)).astype(np.float32)
    files, labels = [], []
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while encoding
        for start in range(0, n, 32):
            count = min(32, n - start)
            x = torch.zeros(count, 3, 3, 4)
            for level in range(7, -1, -1):
                size = (-(-HEIGHT // 2 ** level), -(-WIDTH // 2 ** level))
                x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
                noise = torch.from_numpy(rng.standard_normal((count, 3, *size), dtype=np.float32))
                x += (noise + 0.8 * noise.mean(1, keepdim=True)) * 0.85 ** (7 - level)
            here = [(start + k) % classes for k in range(count)]
            x = 128 + 45 * x / x.std((1, 2, 3), keepdim=True) + torch.from_numpy(cast[here])
            arrays = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            rels = [f"class_{label:02d}/{start + k:06d}.jpg" for k, label in enumerate(here)]
            for rel in rels:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
            list(pool.map(lambda a, r: Image.fromarray(a).save(root / r, quality=90), arrays, rels))
            files += rels
            labels += here
    return FileImages(root, files, np.asarray(labels), "bench-jpegs")


def torchvision_transform(spec: ViewSpec, size: int):
    """BYOL's view as torchvision.transforms, on PIL images (the common DataLoader pipeline)."""
    import torchvision.transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(spec.grayscale_p),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(size), spec.blur_sigma)], p=spec.blur_p),
        T.RandomSolarize(128, p=spec.solarize_p),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViewFiles(torch.utils.data.Dataset):
    def __init__(self, files: FileImages, size: int):
        self.files = files
        self.transforms = [torchvision_transform(spec, size) for spec in BYOL_VIEWS]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files.path(index)) as image:
            image = image.convert("RGB")
        return self.transforms[0](image), self.transforms[1](image), index


def batches_forever(make_epoch, to_views):
    """Yields (view1, view2) on the device without end, starting a new epoch when one runs out."""
    epoch = 0
    while True:
        for batch in make_epoch(epoch):
            yield to_views(batch)
        epoch += 1


def take(batches, n: int) -> None:
    for _ in range(n):
        next(batches)


def make_loaders(files: FileImages, device: torch.device, batch_size: int, cores: int, normalize: Normalize
                 ) -> dict:
    """name -> zero-argument function that builds an endless (view1, view2) iterator."""
    loaders = {}
    sampler = BudgetSampler(len(files), 1.0, batch_size, seed=0)
    from rela.data.dali import DaliTrainLoader, dali_available

    if dali_available():
        def dali():
            loader = DaliTrainLoader(files, sampler, image_size=IMAGE_SIZE, normalize=normalize, seed=0,
                                     device=device, view_mode="byol", num_threads=cores)
            return batches_forever(loader.epoch, lambda b: (b.view1, b.view2))
        loaders["dali"] = dali

    def torchvision_loader():
        data = torch.utils.data.DataLoader(
            TwoViewFiles(files, IMAGE_SIZE), batch_size=batch_size, shuffle=True, num_workers=cores,
            drop_last=True, pin_memory=device.type == "cuda", persistent_workers=True, prefetch_factor=2)

        def to_views(batch):
            v1, v2 = (v.to(device, non_blocking=True) for v in batch[:2])
            if normalize.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            return v1.to(normalize.dtype), v2.to(normalize.dtype)
        return batches_forever(lambda epoch: data, to_views)
    loaders["torchvision"] = torchvision_loader

    def torch_loader():
        source = TorchImageSource(files, device, num_workers=cores)
        loader = TorchTrainLoader(source, sampler, image_size=IMAGE_SIZE, decode_size=default_decode_size(IMAGE_SIZE),
                                  normalize=normalize, seed=0, view_mode="byol")
        return batches_forever(loader.epoch, lambda b: (b.view1, b.view2))
    loaders["torch"] = torch_loader
    return loaders


class TrainerByolStep:
    """The trainer's own BYOL step (rela.step.train_step) on the networks `python -m rela.train --preset
    imagenet --arch ARCH` builds at 224 px (benchmarks.throughput_steps.TrainerStep: its heads and LARS; bf16
    autocast, channels_last and compiled on CUDA; the fused ops where they run), fed each loader's views. The
    batch's indices and labels (the online probe's) are fixed: the step's speed does not depend on them."""

    def __init__(self, arch: str, batch_size: int, num_classes: int, device: torch.device):
        cfg = resolve_config({"dataset": "imagefolder", "preset": "imagenet", "arch": arch, "batch_size": batch_size,
                              "image_size": IMAGE_SIZE})
        precision = "bf16" if device.type == "cuda" else "fp32"  # the trainer's default, as the loaders' dtype
        setup = setup_from_config(f"{arch}-{IMAGE_SIZE}px", cfg, precision, device, num_classes)
        self.step = TrainerStep(setup, device, fused=fused_skip_reason(device) is None, preset="imagenet")
        self.index = torch.arange(batch_size, device=device)
        self.label = self.index % num_classes

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        self.step("byol", TrainBatch(view1, view2, self.index, self.label, views="byol"))


def data_wait_fraction(batches, step: TrainerByolStep, warmup: int, steps: int, device: torch.device) -> dict:
    """Trains `steps` BYOL steps on `batches`; the share of wall time the host spent blocked on data."""
    for _ in range(warmup):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        view1, view2 = next(batches)
        wait += time.perf_counter() - t0
        step(view1, view2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    return {"data_wait_fraction": wait / total, "train_samples_per_s": steps * len(view1) / total}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer images, batches and repeats")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 256 quick, 2048)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 quick, 64 on CPU, 256 on GPU")
    parser.add_argument("--wait-model", default=None, help="backbone (rela.train --arch) that the trainer's BYOL "
                        "step trains in the data-wait run (default resnet50 on a GPU, none on the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    n_images = args.images or (256 if args.quick else 2048)
    batch_size = args.batch_size or (32 if args.quick else 64 if device.type == "cpu" else 256)
    # per repeat, batches: at least what the DataLoader buffers (2 per worker), so repeats are steady state
    chunk = 2 if args.quick else max(4, 2 * cores)
    warmup, repeats = (1, 5) if args.quick else (2, 15)
    wait_model = args.wait_model or ("resnet50" if device.type == "cuda" else "none")
    on_gpu = device.type == "cuda"
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                          channels_last=on_gpu)

    rows = []
    with tempfile.TemporaryDirectory(prefix="rela-loader-bench-") as tmp:
        t0 = time.perf_counter()
        files = write_jpeg_tree(Path(tmp), n_images)
        mean_kb = np.mean([os.path.getsize(files.path(i)) for i in range(len(files))]) / 1024
        print(f"{n_images} JPEGs {WIDTH}x{HEIGHT} q90 ({mean_kb:.0f} KiB each) written in "
              f"{time.perf_counter() - t0:.1f}s; batch {batch_size}, {cores} cores, {device}")
        step = None if wait_model == "none" else TrainerByolStep(wait_model, batch_size,
                                                                 int(files.labels.max()) + 1, device)
        for name, make in make_loaders(files, device, batch_size, cores, normalize).items():
            batches = make()
            timing = time_fn(lambda: take(batches, chunk), device=device, warmup=warmup, repeats=repeats)
            row = {"loader": name, "batch": batch_size, "batches_per_repeat": chunk, **timing,
                   "samples_per_s": chunk * batch_size / timing["median_ms"] * 1e3}
            if step is not None:
                row.update(data_wait_fraction(make(), step, warmup * chunk, repeats * chunk, device))
            rows.append(row)
            batches.close()
            print(f"  {name}: {row['samples_per_s']:.1f} samples/s")
    baseline = next((r["samples_per_s"] for r in rows if r["loader"] == "torchvision"), None)
    for row in rows:
        row["vs_torchvision"] = row["samples_per_s"] / baseline if baseline else None
    columns = ["loader", "batch", "batches_per_repeat", "samples_per_s", "vs_torchvision", "median_ms", "p10_ms",
               "p90_ms"]
    if wait_model != "none":
        columns += ["data_wait_fraction", "train_samples_per_s"]
    print_table(rows, columns)
    payload = {"benchmark": "loader", "question": "two-view 224 px BYOL samples/s from JPEG files",
               "environment": environment(device), "images": n_images, "image_size": [WIDTH, HEIGHT],
               "jpeg_quality": 90, "output_size": IMAGE_SIZE, "cores": cores, "wait_model": wait_model,
               # what the data-wait step ran with, read off its networks (None: no data-wait run)
               "wait_step": None if step is None else {**step.step.settings, "fused": step.step.fused},
               "quick": args.quick, "rows": rows}
    path = write_json(Path(args.out) / f"loader_{device.type}{'_quick' if args.quick else ''}.json", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
