"""The target bank: the prior's features of every training image, PCA-reduced and standardised.

Built once and kept under --bank-dir, one file per (dataset, prior spec, target width), holding the key
it was built for: the dataset's fingerprint, the prior's (spec and weights hash), the input size and the
preprocessing. A run with the same key reuses it; a changed key rebuilds it and says which part changed.
The raw pass over the images is rela._C's (rela/prior/raw_features.py): sharded over ranks, resumable.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rela.errors import RelaError
from rela.prior.pca import PcaProjection, pca_from_sums
from rela.prior.specs import Prior
from rela.utils import distributed as dist_utils
from rela.utils.checkpoint import atomic_torch_save

BANK_FORMAT = 1


@dataclass
class TargetBank:
    targets: torch.Tensor  # (N, k) float32, row i is image i's target
    key: dict
    build_seconds: float
    reused: bool

    @property
    def dim(self) -> int:
        return self.targets.shape[1]

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.targets.index_select(0, index)


def bank_key(*, dataset: str, prior: Prior, crop_fraction: float, target_dim: int, num_rows: int) -> dict:
    return {
        "format": BANK_FORMAT,
        "dataset": dataset,
        "prior": prior.fingerprint,
        "input_size": prior.input_size,
        "preprocessing": f"resize+center-crop(fraction={crop_fraction}) mean={list(prior.mean)} std={list(prior.std)}",
        "target_dim": target_dim,
        "rows": num_rows,
    }


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")[:120]


def key_differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{name} ({stored.get(name)!r} -> {wanted.get(name)!r})"
            for name in sorted(set(stored) | set(wanted)) if stored.get(name) != wanted.get(name)]


def _read_bank(path: Path) -> tuple[dict, torch.Tensor]:
    """(key, targets) of a bank file; RelaError if it is missing or not a bank."""
    if not path.is_file():
        raise RelaError(f"target bank {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        return saved["key"], saved["targets"]
    except Exception as err:  # torn, foreign or unpicklable: the user's file, not our bug
        raise RelaError(f"cannot read target bank {path}: {err}") from None


def load_bank_file(path: Path, wanted_key: dict, device) -> TargetBank:
    """Loads an explicitly given bank; any mismatch with this run is an error naming what differs."""
    stored_key, targets = _read_bank(path)
    differences = key_differences(stored_key, wanted_key)
    if differences:
        raise RelaError(f"target bank {path} was built for another setting: {'; '.join(differences)}")
    if targets.ndim != 2 or targets.shape[0] != wanted_key["rows"] or targets.shape[1] > wanted_key["target_dim"]:
        raise RelaError(f"target bank {path} has shape {tuple(targets.shape)}, expected {wanted_key['rows']} rows "
                        f"of at most {wanted_key['target_dim']} dimensions")
    return TargetBank(targets.to(device), stored_key, 0.0, reused=True)


def prepare_target_bank(prior: Prior, load_images, *, num_rows: int, dataset_fingerprint: str, dataset_name: str,
                        crop_fraction: float, target_dim: int, bank_dir: Path, batch_size: int,
                        dist: dist_utils.DistInfo, device: torch.device, log, explicit_path: Path | None = None,
                        show_progress: bool = True) -> TargetBank:
    """Reuses or builds the bank. load_images(indices int64 (B,)) -> normalised prior input on `device`."""
    start = time.time()
    key = bank_key(dataset=dataset_fingerprint, prior=prior, crop_fraction=crop_fraction,
                   target_dim=target_dim, num_rows=num_rows)
    if explicit_path is not None:
        bank = load_bank_file(Path(explicit_path), key, device)
        log.info(f"target bank: {explicit_path} ({num_rows} x {bank.dim})")
        return bank
    bank_dir = Path(bank_dir)
    path = bank_dir / f"bank-{_slug(dataset_name, prior.spec)}-k{target_dim}.pt"
    if path.is_file():
        try:
            stored_key, targets = _read_bank(path)
            differences = key_differences(stored_key, key)
        except RelaError as err:  # a cached bank that does not read is rebuilt, not fatal
            differences = [str(err)]
        if not differences:
            log.info(f"target bank: reusing {path} ({num_rows} x {targets.shape[1]})")
            return TargetBank(targets.to(device), key, time.time() - start, reused=True)
        log.info(f"target bank: {path} was built for another key, rebuilding: {'; '.join(differences)}")
    targets = _build(prior, load_images, key, path, num_rows=num_rows, batch_size=batch_size, dist=dist,
                     device=device, log=log, show_progress=show_progress)
    return TargetBank(targets, key, time.time() - start, reused=False)


def _build(prior: Prior, load_images, key: dict, path: Path, *, num_rows: int, batch_size: int,
           dist: dist_utils.DistInfo, device: torch.device, log, show_progress: bool) -> torch.Tensor:
    from rela.prior.raw_features import build_raw_features
    from rela.utils.progress import Progress

    encoder = prior.encoder.to(device)
    with torch.no_grad():
        probe = load_images(torch.arange(min(2, num_rows), dtype=torch.int64))
        feature_dim = encoder(probe).shape[1]
    raw_key = {k: v for k, v in key.items() if k != "target_dim"}
    raw_path = path.parent / f"raw-{_digest(raw_key)}.bank"
    log.info(f"target bank: encoding {num_rows} images with prior {prior.spec} ({feature_dim} features, "
             f"{prior.input_size} px) into {raw_path}")
    bar = Progress(total=num_rows // dist.world_size, desc="target bank", unit="img",
                   enabled=dist.is_main and show_progress)
    done_so_far = [0]

    def progress(done: int, total: int) -> None:
        bar.update(done - done_so_far[0])
        done_so_far[0] = done

    raw = build_raw_features(encoder, load_images, num_rows, feature_dim, raw_path,
                             _digest(raw_key), batch_size=batch_size, rank=dist.rank,
                             world_size=dist.world_size, device=device, progress=progress)
    bar.close()
    row_sum = dist_utils.all_reduce_sum_(raw.row_sum.to(device))
    outer_sum = dist_utils.all_reduce_sum_(raw.row_outer_sum.to(device))
    count = int(dist_utils.all_reduce_sum_(torch.tensor([raw.row_count], dtype=torch.float64, device=device)).item())
    if count != num_rows:
        raise RuntimeError(f"raw feature pass accumulated {count} rows, expected {num_rows}")
    projection = pca_from_sums(row_sum, outer_sum, count, key["target_dim"])
    targets = project_rows(raw.features, projection, device)
    if projection.components.shape[1] < key["target_dim"]:
        log.info(f"target bank: the prior's features span {projection.components.shape[1]} dimensions, "
                 f"fewer than the {key['target_dim']} asked for; targets use those")
    if dist.is_main:
        atomic_torch_save({"key": key, "targets": targets.cpu(), "projection": projection.__dict__}, path)
    dist_utils.barrier()
    return targets


def project_rows(features, projection: PcaProjection, device: torch.device, chunk: int = 65536) -> torch.Tensor:
    """The final pass over the raw rows (a memmap), chunk by chunk on the device."""
    projection = PcaProjection(*(t.to(device) for t in (projection.mean, projection.components, projection.scale)))
    out = torch.empty((len(features), projection.components.shape[1]), dtype=torch.float32, device=device)
    for start in range(0, len(features), chunk):
        rows = torch.from_numpy(features[start: start + chunk].copy()).to(device)
        out[start: start + len(rows)] = projection.apply(rows)
    return out
