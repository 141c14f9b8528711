"""What the steps of benchmarks/throughput.py wait on: the trainer's own loader's images/s on the dataset
(against the step's: which one bounds a run) and the seconds a fresh target bank takes to build (part 2).
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.loader import batches_forever, take
from benchmarks.throughput_steps import release_memory
from benchmarks.timing import time_fn
from rela.config import Config
from rela.data.datasets import load_dataset
from rela.data.factory import build_image_source, choose_loader
from rela.eval.features import bank_crop_fraction
from rela.models.backbones import build_backbone
from rela.run import build_run, build_target_bank
from rela.utils.distributed import DistInfo
from rela.utils.progress import RunLog


def time_loaders(cfg: Config, device: torch.device, precision: str, *, warmup: int, repeats: int) -> list[dict]:
    """images/s of the trainer's own loader on the dataset (built by rela.run.build_run, as `python -m
    rela.train` builds it; both view modes), and of DALI where it would run."""
    kinds = ["torch"] + (["dali"] if device.type == "cuda" and choose_loader(cfg, device) else [])
    chunk = max(4, 2 * cfg.workers)  # batches per repeat: more than a worker pool keeps buffered
    rows = []
    for kind in kinds:
        run_cfg = dataclasses.replace(cfg, prior="none", budget=1.0, loader=kind, precision=precision,
                                      device=device.type, progress=False)
        loader = build_run(run_cfg, DistInfo(), device, run_dir=None, log=RunLog(None, enabled=False)).loader
        for mode in ("rela", "byol"):
            loader.set_view_mode(mode)
            batches = batches_forever(loader.epoch, lambda b: b)
            timing = time_fn(lambda: take(batches, chunk), device=device, warmup=warmup, repeats=repeats)
            batches.close()
            rows.append({"loader": kind, "views": mode, "batch": cfg.batch_size,
                         "size": cfg.image_size, "images_per_s": chunk * cfg.batch_size / timing["median_ms"] * 1e3,
                         "median_ms_per_batch": timing["median_ms"] / chunk})
        del loader
        release_memory(device)
    return rows


def bottlenecks(loader_rows: list[dict], step_rows: list[dict], setup_label: str, fused: str) -> list[dict]:
    """For each loader and view mode: the slower of the loader and the matching step at the dataset's setup."""
    step_ips = {r["step"]: r["images_per_s"] for r in step_rows if r["setup"] == setup_label and r["fused"] == fused}
    out = []
    for row in loader_rows:
        step = step_ips.get(row["views"])
        out.append({**row, "step": f"{row['views']} (fused {fused})", "step_images_per_s": step,
                    "bottleneck": None if step is None else ("loader" if row["images_per_s"] < step else "step")})
    return out


def build_fresh_bank(cfg: Config, device: torch.device, bank_dir: Path) -> dict:
    """Builds the bank with the trainer's own rela.run.build_target_bank, in an empty folder, and times it."""
    splits = load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed, val_fraction=cfg.val_fraction)
    source = build_image_source(cfg, splits.train, device, choose_loader(cfg, device))
    target_dim = build_backbone(cfg.arch).feature_dim
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    bank = build_target_bank(dataclasses.replace(cfg, bank_dir=str(bank_dir), progress=False), splits, source,
                             bank_crop_fraction(splits, cfg.bank_crop_fraction), target_dim, DistInfo(), device, RunLog(None, enabled=False))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    assert not bank.reused, "a fresh bank folder must not hold a bank"
    return {"seconds": seconds, "images": len(splits.train), "dim": bank.dim, "prior_input_size": bank.key["input_size"],
            "precision": bank.key["precision"]}


def time_bank(cfg: Config, device: torch.device, repeats: int) -> dict:
    builds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="rela-bank-bench-") as bank_dir:
            builds.append(build_fresh_bank(cfg, device, Path(bank_dir)))
    seconds = statistics.median(b["seconds"] for b in builds)
    images = builds[0]["images"]
    # The prior's precision is part of the bank's key; bf16 runs on channels_last (prior_encoder).
    return {"prior": cfg.prior, "arch": cfg.arch, "prior_input_size": builds[0]["prior_input_size"],
            "precision": builds[0]["precision"], "channels_last": builds[0]["precision"] == "bf16",
            "images": images, "dim": builds[0]["dim"], "builds": len(builds),
            "seconds_per_build": [b["seconds"] for b in builds], "seconds": seconds,
            "seconds_per_1000_images": seconds / images * 1000, "images_per_s": images / seconds}
