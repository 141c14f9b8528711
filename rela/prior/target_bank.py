"""The target bank: the prior's features of every training image, PCA-reduced and standardised.

Built once and kept under --bank-dir, one file per (dataset, prior spec, target width), holding the key
it was built for: the dataset's fingerprint, the prior's (spec and weights hash), the input size and the
preprocessing. A run with the same key reuses it; a changed key rebuilds it and says which part changed.
The raw pass over the images is rela._C's (rela/prior/raw_features.py): sharded over ranks, resumable.
Two runs that need the same bank at once do not both build it: the first holds a file lock beside it
while it checks and builds, the second waits and then reuses the bank. A bank file is checked before use
(its zip archive's CRC-32s: a flipped byte or a torn file) and read with the weights-only unpickler.
On CUDA the prior runs under bf16 autocast on channels_last images (fp32 elsewhere; --prior-precision chooses);
the precision is part of the key, so a bf16 bank is never taken for an fp32 one. The next batch's images are
read on a thread while the prior runs on the current one, and the PCA projection of the rows is split over
ranks, each share broadcast into the one (N, k) tensor every rank holds.

Several nodes (torchrun --nnodes N): rank 0 alone takes the dataset's fingerprint (a stat of every file; a node's
staged copy has its own modification times) and caches the file list beside the banks; every other rank checks
that its relative file names match rank 0's. Rank 0 decides whether the bank is reused or built, and says so to
every rank, so the ranks never take different branches and leave the collectives waiting. The bank folder must
be shared by every node (checked with a probe file). The targets are kept in bfloat16 (the loss casts them to
its own dtype): half the memory of float32 (ImageNet, 1.28M rows of 2048: 5.2 GB, not 10.5), written straight
to the file and read back memory-mapped, so no copy of them is held twice on the host.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rela.errors import RelaError
from rela.prior.pca import PcaProjection, pca_from_sums
from rela.prior.specs import Prior
from rela.utils import distributed as dist_utils
from rela.utils.faults import kill_point, write_fault
from rela.utils.files import check_archive, load_plain
from rela.utils.locks import FileLock

BANK_FORMAT = 1
TARGETS_DTYPE = torch.bfloat16


@dataclass
class TargetBank:
    targets: torch.Tensor  # (N, k) bfloat16 (TARGETS_DTYPE), row i is image i's target
    key: dict
    build_seconds: float
    reused: bool

    @property
    def dim(self) -> int:
        return self.targets.shape[1]

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.targets.index_select(0, index)


PRIOR_PRECISIONS = ("auto", "fp32", "bf16")


def prior_precision(device: torch.device, choice: str = "auto") -> str:
    """How the prior runs on `device` (--prior-precision `choice`): "fp32" or "bf16" as asked; auto is "bf16"
    (autocast, channels_last) on CUDA and "fp32" elsewhere."""
    if choice not in PRIOR_PRECISIONS:
        raise RelaError(f"--prior-precision must be one of {', '.join(PRIOR_PRECISIONS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def bank_key(*, dataset: str, prior: Prior, crop_fraction: float, target_dim: int, num_rows: int,
             precision: str = "fp32") -> dict:
    return {
        "format": BANK_FORMAT,
        "dataset": dataset,
        "prior": prior.fingerprint,
        "input_size": prior.input_size,
        "preprocessing": f"resize+center-crop(fraction={crop_fraction}) mean={list(prior.mean)} std={list(prior.std)}",
        "precision": precision,
        "target_dim": target_dim,
        "rows": num_rows,
        "targets_dtype": str(TARGETS_DTYPE).removeprefix("torch."),
    }


def prior_encoder(encoder: torch.nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> (B, D) float32 features, run at `precision` ("bf16": autocast on the images'
    device, CUDA or CPU, on channels_last images and weights, as the trainer runs its networks; "fp32": as it is)."""
    if precision == "fp32":
        return encoder
    if precision != "bf16":
        raise ValueError(f"unknown prior precision {precision!r}")
    encoder = encoder.to(memory_format=torch.channels_last)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return encoder(images.contiguous(memory_format=torch.channels_last)).float()

    return encode


class PrefetchingLoader:
    """`load(indices)` with the next batch read on a thread while the caller works on this one.

    After each call, `guess_next(indices)` names the batch expected next (None: none); a call with exactly
    those indices takes the thread's result (counted in `hits`), any other call loads directly, so the rows
    and their order are always those asked for. An error of a prefetched load is raised by the call that
    asks for that batch; a prefetch that was not asked for is waited for and forgotten. One thread, one batch
    ahead: `load` is never run twice at once. Use as a context manager, or call `close`.
    """

    def __init__(self, load: Callable[[torch.Tensor], torch.Tensor],
                 guess_next: Callable[[torch.Tensor], torch.Tensor | None]):
        self.load, self.guess_next = load, guess_next
        self.hits = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bank-prefetch")
        self._pending: tuple[torch.Tensor, Future] | None = None

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], indices):
            batch = pending[1].result()
            self.hits += 1
        else:
            if pending is not None:
                pending[1].exception()  # wait for it: `load` must not run on two threads at once
            batch = self.load(indices)
        following = self.guess_next(indices)
        if following is not None:
            self._pending = (following, self._pool.submit(self.load, following))
        return batch

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].exception()
            self._pending = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "PrefetchingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_bounds(num_rows: int, world_size: int) -> list[int]:
    """Rank r owns rows [bounds[r], bounds[r + 1]): rela._C.shard_range's split, r * N // W."""
    return [r * num_rows // world_size for r in range(world_size + 1)]


def next_in_shard(shard_end: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """The raw pass's next batch when its rows are consecutive (a fresh build): the following indices up to
    `shard_end`, a short last batch padded with its last index as rela._C's ShardPlan pads it."""
    def guess(indices: torch.Tensor) -> torch.Tensor | None:
        start, size = int(indices[-1]) + 1, len(indices)
        if start >= shard_end:
            return None
        following = torch.arange(start, min(start + size, shard_end), dtype=torch.int64)
        return torch.cat([following, following[-1:].expand(size - len(following))])

    return guess


def agreed_fingerprint(dataset, dist: dist_utils.DistInfo, list_dir: Path | None = None) -> str:
    """The training images' fingerprint as rank 0 takes it, on every rank.

    Rank 0 alone stats the files (FileImages.fingerprint), and caches their list, the bank's row order, in
    `list_dir` as files-DIGEST.list (name, size, mtime, label per line; written once per fingerprint). The
    other ranks check that they list the same relative names with the same labels (a digest, no stat), so a
    node whose staged copy has other modification times still reuses rank 0's bank. A rank that differs is one
    RelaError on every rank, naming a file that one side lacks."""
    from rela.data.datasets import FileImages, list_class_folders

    fingerprint = None
    if dist.is_main:
        if isinstance(dataset, FileImages) and list_dir is not None:
            fingerprint = _fingerprint_with_list(dataset, Path(list_dir))
        else:
            fingerprint = dataset.fingerprint()
    if not dist.enabled:
        return fingerprint
    names = dataset.names_digest()
    fingerprint, reference = dist_utils.broadcast_object((fingerprint, names), dist)
    differs = dist_utils.gather_objects(names != reference, dist)
    if not any(differs):
        return fingerprint
    # The error path: compare whole listings of the tree, not the training split (a held-out split of a tree
    # with one file less moves other files between the splits).
    listing = list_class_folders(dataset.root) if isinstance(dataset, FileImages) else None
    reference = dist_utils.broadcast_object(listing, dist)
    error = _name_difference(dataset, listing, reference, dist.rank) if differs[dist.rank] else None
    error = next(e for e in dist_utils.gather_objects(error, dist) if e is not None)
    raise RelaError(f"{error}; every node needs the same files under --data "
                    f"({sum(differs)} of {dist.world_size} ranks differ from rank 0)")


def _fingerprint_with_list(dataset, list_dir: Path) -> str:
    digest = hashlib.sha256()
    list_dir.mkdir(parents=True, exist_ok=True)
    tmp = list_dir / f".files.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            for line in dataset.stat_lines():
                digest.update(line)
                fh.write(line)
        fingerprint = f"{dataset.name}:files:{len(dataset)}:{digest.hexdigest()[:16]}"
        listed = file_list_path(list_dir, fingerprint)
        if not listed.is_file():
            os.replace(tmp, listed)
    finally:
        tmp.unlink(missing_ok=True)
    return fingerprint


def file_list_path(list_dir: Path, fingerprint: str) -> Path:
    """Where rank 0 caches the file list whose stats gave `fingerprint`."""
    return Path(list_dir) / f"files-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.list"


def _name_difference(dataset, listing: list[str] | None, reference: list[str] | None, rank: int) -> str:
    """One line naming how this rank's image tree differs from rank 0's (`listing`, `reference`: their files)."""
    from rela.data.datasets import shown

    where = f"rank {rank} on {socket.gethostname()}"
    if listing is None or reference is None:
        return f"{where} holds other training images than rank 0 (shape or labels differ)"
    mine, theirs = set(listing), set(reference)
    missing = [n for n in reference if n not in mine]
    if missing:
        return (f"{where} lacks {shown(dataset.root / missing[0])}, which rank 0 has ({len(missing)} file(s) "
                "missing there)")
    extra = [n for n in listing if n not in theirs]
    if extra:
        return f"{where} has {shown(dataset.root / extra[0])}, which rank 0 lacks ({len(extra)} extra file(s))"
    return f"{where} lists the same files as rank 0 with other class labels or splits (other class folders?)"


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")[:120]


def key_differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{name} ({stored.get(name)!r} -> {wanted.get(name)!r})"
            for name in sorted(set(stored) | set(wanted)) if stored.get(name) != wanted.get(name)]


def _read_bank(path: Path, check: bool = True) -> tuple[dict, torch.Tensor]:
    """(key, targets) of a bank file, the targets memory-mapped; RelaError if it is missing, damaged, unsafe or
    not a bank. check=False skips the archive's CRC-32s (another rank has just checked the same file)."""
    if not path.is_file():
        raise RelaError(f"target bank {path} does not exist")
    try:
        if check:
            check_archive(path)
        saved = load_plain(path, mmap=True)
        key, targets = saved["key"], saved["targets"]
    except RelaError as err:
        raise RelaError(f"cannot read target bank {path}: {err}") from None
    except Exception as err:  # torn or foreign: the user's file, not our bug
        raise RelaError(f"cannot read target bank {path}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    if not isinstance(key, dict) or not isinstance(targets, torch.Tensor):
        raise RelaError(f"cannot read target bank {path}: not a target bank written by rela")
    return key, targets


def load_bank_file(path: Path, wanted_key: dict, device) -> TargetBank:
    """Loads an explicitly given bank; any mismatch with this run is an error naming what differs."""
    stored_key, targets = _read_bank(path)
    differences = key_differences(stored_key, wanted_key)
    if differences:
        raise RelaError(f"target bank {path} was built for another setting: {'; '.join(differences)}")
    if targets.ndim != 2 or targets.shape[0] != wanted_key["rows"] or targets.shape[1] > wanted_key["target_dim"]:
        raise RelaError(f"target bank {path} has shape {tuple(targets.shape)}, expected {wanted_key['rows']} rows "
                        f"of at most {wanted_key['target_dim']} dimensions")
    return TargetBank(targets.to(device, TARGETS_DTYPE), stored_key, 0.0, reused=True)


def prepare_target_bank(prior: Prior, load_images, *, num_rows: int, dataset_fingerprint: str, dataset_name: str,
                        crop_fraction: float, target_dim: int, bank_dir: Path, batch_size: int,
                        dist: dist_utils.DistInfo, device: torch.device, log, explicit_path: Path | None = None,
                        show_progress: bool = True, precision: str = "auto") -> TargetBank:
    """Reuses or builds the bank. load_images(indices int64 (B,)) -> normalised prior input on `device`.
    precision: --prior-precision ("auto", "fp32", "bf16"), resolved for `device` by prior_precision."""
    start = time.time()
    key = bank_key(dataset=dataset_fingerprint, prior=prior, crop_fraction=crop_fraction,
                   target_dim=target_dim, num_rows=num_rows, precision=prior_precision(device, precision))
    if explicit_path is not None:
        bank = load_bank_file(Path(explicit_path), key, device)
        log.info(f"target bank: {explicit_path} ({num_rows} x {bank.dim})")
        return bank
    bank_dir = Path(bank_dir)
    path = bank_dir / f"bank-{_slug(dataset_name, prior.spec)}-k{target_dim}.pt"
    # One process builds, the others wait and reuse: rank 0 of each run takes the lock, its ranks follow.
    lock = FileLock(bank_dir / f".{path.name}.lock", warn=log.info) if dist.is_main else None
    if lock is not None and not lock.try_acquire():
        log.info(f"target bank: another process (pid {lock.holder()}) is building {path}; waiting for it")
        lock.acquire()
    try:
        # Rank 0 alone reads and judges the cached bank; every rank follows its decision.
        targets, decision = None, None
        if dist.is_main:
            targets, decision = _judge_cached_bank(path, key)
        decision = dist_utils.gather_objects(decision, dist)[0]
        if decision is None:  # reuse
            error = None
            if not dist.is_main:
                try:
                    _, targets = _read_bank(path, check=False)
                except RelaError as err:
                    error = f"rank {dist.rank} on {socket.gethostname()}: {err}"
            error = next((e for e in dist_utils.gather_objects(error, dist) if e is not None), None)
            if error is not None:
                raise RelaError(f"{error}; is --bank-dir {bank_dir} shared by every node?")
            log.info(f"target bank: reusing {path} ({num_rows} x {targets.shape[1]})")
            return TargetBank(targets.to(device, TARGETS_DTYPE), key, time.time() - start, reused=True)
        if decision:
            log.info(decision)
        targets = _build(prior, load_images, key, path, num_rows=num_rows, batch_size=batch_size, dist=dist,
                         device=device, log=log, show_progress=show_progress)
        return TargetBank(targets, key, time.time() - start, reused=False)
    finally:
        if lock is not None:
            lock.release()


def _judge_cached_bank(path: Path, key: dict) -> tuple[torch.Tensor | None, str | None]:
    """(targets, None) if the bank at `path` is intact and built for `key`; else (None, why it is (re)built)."""
    if not path.is_file():
        return None, ""
    try:
        stored_key, targets = _read_bank(path)
        differences = key_differences(stored_key, key)
    except RelaError as err:  # a cached bank that does not read is rebuilt, not fatal
        return None, f"target bank: {err}; rebuilding it"
    if differences:
        return None, f"target bank: {path} was built for another key, rebuilding: {'; '.join(differences)}"
    return targets, None


def _build(prior: Prior, load_images, key: dict, path: Path, *, num_rows: int, batch_size: int,
           dist: dist_utils.DistInfo, device: torch.device, log, show_progress: bool) -> torch.Tensor:
    from rela.prior.raw_features import RawBankDamaged, build_raw_features
    from rela.utils.progress import Progress

    encode = prior_encoder(prior.encoder.to(device), key["precision"])
    with torch.no_grad():
        probe = load_images(torch.arange(min(2, num_rows), dtype=torch.int64))
        try:  # the first meeting of the prior and the data: a prior made for other inputs fails here
            feature_dim = encode(probe).shape[1]
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # TorchScript's message ends with the error, after its traceback
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise RelaError(f"--prior {prior.spec} does not fit its input {tuple(probe.shape[1:])}: {reason}") from None
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
        kill_point("bank-build", done)  # tests: a death part-way through the raw pass

    shard_end = shard_bounds(num_rows, dist.world_size)[dist.rank + 1]
    raw_args = dict(batch_size=batch_size, rank=dist.rank, world_size=dist.world_size, device=device,
                    progress=progress)
    with PrefetchingLoader(load_images, next_in_shard(shard_end)) as load:
        try:
            raw = build_raw_features(encode, load, num_rows, feature_dim, raw_path, _digest(raw_key), **raw_args)
        except RawBankDamaged as err:  # the raw file is a cache: a damaged one (its checksum, its header) is rebuilt
            log.info(f"target bank: {err}; rebuilding it")
            raw = build_raw_features(encode, load, num_rows, feature_dim, raw_path, _digest(raw_key),
                                     rebuild=True, **raw_args)
    bar.close()
    row_sum = dist_utils.all_reduce_sum_(raw.row_sum.to(device))
    outer_sum = dist_utils.all_reduce_sum_(raw.row_outer_sum.to(device))
    count = int(dist_utils.all_reduce_sum_(torch.tensor([raw.row_count], dtype=torch.float64, device=device)).item())
    if count != num_rows:
        raise RuntimeError(f"raw feature pass accumulated {count} rows, expected {num_rows}")
    projection = pca_from_sums(row_sum, outer_sum, count, key["target_dim"], what=f"prior {prior.spec}'s features")
    targets = project_rows(raw.features, projection, device, rank=dist.rank, world_size=dist.world_size,
                           num_rows=num_rows, first_row=raw.first_row, dtype=TARGETS_DTYPE)
    if projection.components.shape[1] < key["target_dim"]:
        log.info(f"target bank: the prior's features span {projection.components.shape[1]} dimensions, "
                 f"fewer than the {key['target_dim']} asked for; targets use those")
    error = None
    if dist.is_main:
        existed = path.is_file()
        try:
            _save_bank({"key": key, "targets": targets.cpu(), "projection": projection.__dict__}, path)
        except OSError as err:  # a full or read-only disk: said on every rank, the file there before kept
            error = (f"cannot write target bank {path}: {err.strerror or err} (errno {err.errno}); "
                     + ("the bank file there before is intact" if existed else "nothing was written there"))
    error = dist_utils.gather_objects(error, dist)[0]  # also the barrier: the file is complete for every rank
    if error is not None:
        raise RelaError(error)
    return targets


def _save_bank(obj: dict, path: Path) -> None:
    """torch.save straight into a temporary file beside `path`, fsync'ed and renamed onto it: a reader never sees a
    half-written bank, and the host never holds the serialised bytes beside the tensor (atomic_torch_save's
    in-memory buffer would: 5 GB more for ImageNet)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if (fault := write_fault(path)) is not None:  # tests: a disk that fills half-way
                fh.write(b"PK\x03\x04")
                raise fault
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        kill_point("write", path.name)  # tests: a death between the complete temporary file and the rename
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def project_rows(features, projection: PcaProjection, device: torch.device, *, rank: int = 0, world_size: int = 1,
                 chunk: int = 65536, num_rows: int | None = None, first_row: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The final pass over the raw rows (a memmap): each rank projects its share, chunk by chunk on the
    device, and the shares are exchanged (torch.distributed), so every rank returns all (N, k) rows in `dtype`.
    features: rows first_row.. of the N = num_rows (default: all N rows, from 0); they must hold this rank's share.
    The (N, k) result is allocated once: each rank writes its share into its own rows and every share is
    broadcast from its rank into the same rows of the others' (broadcast_rows_), so a GPU holds one bank while
    it runs (a gather's receive buffers and their concatenation would be two more)."""
    projection = PcaProjection(*(t.to(device) for t in (projection.mean, projection.components, projection.scale)))
    bounds = shard_bounds(len(features) if num_rows is None else num_rows, world_size)
    begin, end = bounds[rank], bounds[rank + 1]
    if begin < first_row or end > first_row + len(features):
        raise ValueError(f"rows [{first_row}, {first_row + len(features)}) do not hold rank {rank}'s [{begin}, {end})")
    out = torch.empty((bounds[-1], projection.components.shape[1]), dtype=dtype, device=device)
    for start in range(begin, end, chunk):
        rows = torch.from_numpy(features[start - first_row: min(start + chunk, end) - first_row].copy()).to(device)
        out[start: start + len(rows)] = projection.apply(rows)
    if world_size == 1:
        return out
    return dist_utils.broadcast_rows_(out, bounds)
