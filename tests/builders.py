"""Builders for the trainer's tests: small ImageFolder and CIFAR trees in tmp folders, fast CLI options.

A plain module (not conftest.py): several conftest modules exist, and `import conftest` would pick any."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 8, size=(40, 32), seed: int = 0,
                      fmt: str = "JPEG") -> Path:
    """class_k/img_i.jpg with a class-dependent colour and noise, so classes are learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size[1], size[0], 3), np.float32)
            base[..., k % 3] = 180
            image = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            suffix = ".png" if fmt == "PNG" else ".jpg"
            Image.fromarray(image).save(folder / f"img_{i:03d}{suffix}", format=fmt, quality=90)
    return root


def write_cifar10(root: Path, per_batch: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, fh)
    return root


# --device cpu: the trainer's tests check the trainer, not the machine; on a GPU machine the default (auto)
# would put 2-rank runs on cuda:1 of a 1-GPU machine. GPU runs are the `gpu`-marked tests' business.
FAST_ARGS = ["--dataset", "digits", "--arch", "small_resnet", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
             "--probe-epochs", "5", "--no-progress", "--workers", "0", "--device", "cpu",
             "--no-curves"]  # matplotlib's import and a drawing cost seconds a run; tests/ecosystem draws them


BANDS, BAND_ROWS = 8, 4  # 32 rows: band 0 bright and band 7 dark (references), bands 1-6 the id's bits


def write_striped_cifar10(root: Path, per_batch: int = 12) -> Path:
    """CIFAR-10 batches whose image with global training index g shows g in horizontal grey bands that
    survive the views (whole-image crops, horizontal flips, monotone colour jitter): see `decode_ids`."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        ids = np.arange(b * per_batch, (b + 1) * per_batch) % 2 ** (BANDS - 2)
        levels = np.empty((per_batch, BANDS), np.uint8)
        levels[:, 0], levels[:, -1] = 200, 60
        for bit in range(BANDS - 2):
            levels[:, bit + 1] = np.where((ids >> bit) & 1, 200, 60)
        rows = np.repeat(levels, BAND_ROWS, axis=1)                        # (n, 32)
        images = np.broadcast_to(rows[:, None, :, None], (per_batch, 3, 32, 32))
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": images.reshape(per_batch, -1).copy(), b"labels": (ids % 10).tolist()}, fh)
    return root


def decode_ids(views) -> "np.ndarray":
    """The ids that `write_striped_cifar10` drew into a batch of views (B, 3, 32, 32), from the middle
    rows of each band against the midpoint of the two reference bands."""
    rows = views.float().mean(dim=(1, 3)).cpu().numpy()                  # (B, 32)
    bands = rows.reshape(len(rows), BANDS, BAND_ROWS)[:, :, 1:3].mean(-1)  # (B, 8)
    threshold = (bands[:, :1] + bands[:, -1:]) / 2
    bits = bands[:, 1:-1] > threshold
    return (bits * (1 << np.arange(BANDS - 2))).sum(1)


def training_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows of training steps (not the kNN monitor's)."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def expected_step_fn(step: int, end: int, train_steps: int, method: str = "byol", handover: str = "linear") -> str:
    """The step function a step runs with the RELA phase ending at step `end`: RELA's to it; then, under the
    default linear hand-over, a tenth of the run's steps blended (--handover-steps unset); then the method's."""
    if step <= end:
        return "rela_step"
    if handover == "linear" and step <= end + max(1, round(0.1 * train_steps)):
        return f"blend_{method}_step"
    return f"{method}_step"


def assert_same_backbones(a: Path, b: Path) -> None:
    """Two run folders' backbone.pt hold the same tensors, bit for bit."""
    import torch

    one, two = (torch.load(p / "backbone.pt")["state_dict"] for p in (a, b))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
