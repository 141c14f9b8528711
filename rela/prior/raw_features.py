"""The raw pass of the target bank: the frozen prior's features of every training image.

Every rank runs at once and writes its own shard of rows; a build killed at any point resumes where it
stopped; a half-written bank is never taken for a complete one. The work is rela._C's (csrc/): this module
drives it and keeps the covariance sums the PCA needs.

One process writes one file: `path` itself, or under torchrun one shard file per rank beside it
(`shard_path`: PATH.shardRofW). Ranks on several nodes never write one memory-mapped file together: NFS
keeps no coherence between two nodes' mappings of a file, so rows written on one node could reach the file
as stale pages of the other. Each rank finalises its own shard, and the ranks agree that every shard is
complete with an all-reduce; each rank reads back only its own rows (the PCA sums, the projection).

The bank file (layout in csrc/bank_file.h) holds a header (key, shape, dtype, state, checksum), the
rows at their dataset index, and one done-flag byte per row. A row is flagged only after its data was
msync'ed; the 'complete' state and the rows' checksum are written last, after every row is flagged.

Sharding: rank r of W owns the contiguous rows [r * N // W, (r + 1) * N // W) (rela._C.shard_range), held
in its shard file at row (index - first row), and computes those of them not flagged done, in batches of exactly `batch_size` indices (the last one padded
with its last index and masked), so the prior sees one static shape.

Covariance sums: row_sum and row_outer_sum are accumulated on `device` in float64 as the rows stream
in, from the values as stored (float16 banks: the rounded values). They are not persisted: rows that an
earlier run already wrote (a resumed build, or a complete bank) are read back from the file and summed,
one read of this rank's shard, which is cheap next to the prior and cannot disagree with the done flags
after a kill, as sums saved beside the bank could.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from rela.errors import RelaError

_STORAGE = {torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16)}
_READ_BACK_ROWS = 8192  # rows per chunk when summing rows read back from the file
_MAX_KEY_BYTES = 3968   # what fits in the header (csrc/bank_file.h)


@dataclass
class RawFeatures:
    path: Path                      # the raw bank file (this rank's shard file under torchrun)
    features: np.ndarray            # (rows, feature_dim) read-only memmap of this file's rows (float32|float16)
    row_sum: torch.Tensor           # (feature_dim,) float64, sum over this rank's rows, on `device`
    row_outer_sum: torch.Tensor     # (feature_dim, feature_dim) float64, sum of x x^T over this rank's rows
    row_count: int                  # rows this rank accumulated (its whole shard)
    rows_computed: int = 0          # rows the prior ran on in this call (0: the bank was complete)
    rows_per_s: float = 0.0         # this rank's build throughput (prior + copy + write), 0 if nothing ran
    first_row: int = 0              # the dataset index of features[0] (the shard's first row)


class RawBankDamaged(RelaError):
    """A raw bank file that exists but cannot be used (another key or shape, a bad checksum): rebuild it."""


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """Rank `rank`'s file of a raw bank built by `world_size` ranks (`path` itself for one rank)."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.name}.shard{rank}of{world_size}")


def build_raw_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    load_batch: Callable[[torch.Tensor], torch.Tensor],
    num_rows: int, feature_dim: int, path: Path, key: str, *,
    batch_size: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    rebuild: bool = False, flush_seconds: float = 2.0, ring_slots: int = 3, verify_checksum: bool = True,
) -> RawFeatures:
    """Builds, resumes or reuses the raw bank at `path`; returns it with this rank's covariance sums.

    encode: images (B, C, H, W) on device -> features (B, feature_dim) float32|bf16|fp16, called under
        torch.no_grad(), always with B == batch_size.
    load_batch: int64 CPU indices (B,) -> the prior's normalised input (B, C, H, W) on device.
    key: what the bank was built for (prior, data, preprocessing); a bank at `path` with another key,
        shape or dtype, or a complete bank whose checksum fails, raises RawBankDamaged naming which, unless
        rebuild=True, which deletes it first. A partial bank with the same key, shape and dtype resumes.
    world_size > 1: torch.distributed must be initialised; every rank must call this with the same
        arguments but its rank, writes its shard to shard_path(path, rank, world_size), and returns once
        every shard is complete. An error of one rank's file is raised on every rank.
    flush_seconds: how often written rows are msync'ed and flagged done (0: after every batch); rows not
        flagged when a build is killed are computed again.
    ring_slots: host buffers between the prior and the writer thread (batches in flight).
    verify_checksum: check a complete bank's checksum before reusing it (reads the whole file).
    """
    _C = _extension()
    path = Path(path)
    device = torch.device(device)
    _check_arguments(num_rows, feature_dim, key, batch_size, rank, world_size, storage_dtype, ring_slots)
    dtype_name, np_dtype = _STORAGE[storage_dtype]
    distributed = world_size > 1

    shard_begin, shard_end = _C.shard_range(num_rows, rank, world_size)
    if world_size > 1 and not rebuild and _complete_with(_C, path, key, num_rows, feature_dim, dtype_name):
        # A complete bank written by one process: only read from here on, so every rank may share it.
        file_rows, offset, file_key = num_rows, 0, key
    else:
        file_rows, offset = shard_end - shard_begin, shard_begin
        path = shard_path(path, rank, world_size)
        file_key = key if world_size == 1 else f"{key}/shard{rank}of{world_size}"
    row_sum = torch.zeros(feature_dim, dtype=torch.float64, device=device)
    row_outer_sum = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)
    rows_computed, rows_per_s = 0, 0.0
    threads = max(1, min(16, (os.cpu_count() or 1) // world_size))

    error = None
    try:
        if rebuild:
            path.unlink(missing_ok=True)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _C.create_bank(str(path), file_rows, feature_dim, dtype_name, file_key)
        header = _read_header(_C, path)
        _check_header(header, path, file_key, file_rows, feature_dim, dtype_name)
        bank = _C.BankFile(str(path))
        if header["complete"] and verify_checksum:
            computed = bank.checksum(threads)
            if computed != header["checksum"]:
                raise RawBankDamaged(f"raw bank {path}: checksum mismatch (stored {header['checksum']:#018x}, "
                                     f"computed {computed:#018x}): the file is corrupt; delete it or pass rebuild=True")
    except RelaError as err:
        error = err
    # Every rank raises the first rank's error, instead of leaving the others waiting in a collective.
    error = next((e for e in _gather(error, distributed) if e is not None), None)
    if error is not None:
        raise error

    if header["complete"]:
        features = _memmap(path, header, np_dtype)
        _add_rows_(row_sum, row_outer_sum, features, shard_begin - offset, shard_end - offset, None)
        if progress is not None:
            progress(shard_end - shard_begin, shard_end - shard_begin)
    else:
        done = bank.done_flags()  # this file's flags change only through this rank from here on
        plan = _C.ShardPlan(bank, 0, 1, batch_size)
        _add_rows_(row_sum, row_outer_sum, _memmap(path, header, np_dtype), 0, file_rows, done.bool())
        rows_computed, rows_per_s = _stream_rows_(
            _C, bank, plan, encode, lambda local: load_batch(local + shard_begin), row_sum, row_outer_sum,
            device=device, storage_dtype=storage_dtype, feature_dim=feature_dim, flush_seconds=flush_seconds,
            ring_slots=ring_slots, progress=progress)
        bank.finalize(threads)
        bank.reload_header()
        header = bank.header
        features = _memmap(path, header, np_dtype)
    if not _all_ranks(header["complete"], distributed, device):
        raise RuntimeError(f"raw bank {path}: not every rank's shard is complete after every rank finished its rows")

    return RawFeatures(path=path, features=features, row_sum=row_sum, row_outer_sum=row_outer_sum,
                       row_count=shard_end - shard_begin, rows_computed=rows_computed, rows_per_s=rows_per_s,
                       first_row=offset)


def _complete_with(_C, path: Path, key: str, num_rows: int, feature_dim: int, dtype_name: str) -> bool:
    """Whether `path` is a complete bank of this key, shape and dtype (its checksum is checked later)."""
    if not Path(path).is_file():
        return False
    try:
        header = _C.read_bank_header(str(path))
    except RuntimeError:
        return False
    return (header["header_intact"] and header["complete"] and header["key"].decode(errors="replace") == key
            and (header["num_rows"], header["feature_dim"], header["dtype"]) == (num_rows, feature_dim, dtype_name))


def read_bank_state(path: Path) -> dict:
    """The header of the raw bank at `path` (key, shape, dtype, complete, ...) and its rows flagged done."""
    _C = _extension()
    header = _read_header(_C, Path(path))
    header["rows_done"] = _C.BankFile(str(path)).count_done() if header["header_intact"] else None
    return header


def _stream_rows_(_C, bank, plan, encode, load_batch, row_sum, row_outer_sum, *, device, storage_dtype,
                  feature_dim, flush_seconds, ring_slots, progress) -> tuple[int, float]:
    """Runs the prior over the plan's batches, hands the outputs to the writer, accumulates the sums."""
    batch_size = plan.batch_size
    shard_rows = plan.shard_end - plan.shard_begin
    rows_done = shard_rows - plan.pending_rows
    if progress is not None:
        progress(rows_done, shard_rows)
    if plan.num_batches == 0:
        return 0, 0.0
    # Without the CUDA build (or off CUDA) the output comes to the host with .cpu(): a sync per batch.
    on_device = device.type == "cuda" and _C.with_cuda
    writer_device = (device.index if device.index is not None else torch.cuda.current_device()) if on_device else -1
    writer = _C.BankWriter(bank, batch_size, ring_slots, flush_seconds, writer_device)
    positions = torch.arange(batch_size, device=device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for b in range(plan.num_batches):
                indices, valid = plan.batch(b)
                out = encode(load_batch(indices))
                if b == 0:
                    _check_output(out, batch_size, feature_dim, device)
                # Sums of the values as stored, so they match a later read of the file.
                x = out.to(storage_dtype).to(torch.float64) * (positions < valid).unsqueeze(1)
                row_sum += x.sum(0)
                row_outer_sum.addmm_(x.T, x)
                if on_device:
                    writer.submit(out, indices, valid, torch.cuda.current_stream(out.device).cuda_stream)
                else:
                    writer.submit(out.cpu(), indices, valid)
                rows_done += valid
                if progress is not None:
                    progress(rows_done, shard_rows)
    except BaseException:
        try:  # keep the rows already handed over: a resume will not compute them again
            writer.finish()
        except Exception:
            pass
        raise
    writer.finish()
    seconds = time.perf_counter() - start
    return plan.pending_rows, plan.pending_rows / seconds if seconds > 0 else 0.0


def _add_rows_(row_sum, row_outer_sum, features: np.ndarray, begin: int, end: int, done) -> None:
    """Adds rows [begin, end) of the file (those with `done` set, or all) to the sums."""
    for start in range(begin, end, _READ_BACK_ROWS):
        stop = min(end, start + _READ_BACK_ROWS)
        chunk_done = None if done is None else done[start - begin:stop - begin]
        if chunk_done is not None and not chunk_done.any():
            continue  # a fresh shard reads nothing
        block = torch.from_numpy(np.array(features[start:stop]))
        if chunk_done is not None:
            block = block[chunk_done]
        x = block.to(row_sum.device, torch.float64)
        row_sum += x.sum(0)
        row_outer_sum.addmm_(x.T, x)


def _extension():
    try:
        return importlib.import_module("rela._C")
    except ImportError as err:
        raise RelaError(f"rela's C++ extension rela._C is not built or does not load ({err}); build it from the "
                        "repository with `pip install --no-build-isolation -e .`") from None


def _check_arguments(num_rows, feature_dim, key, batch_size, rank, world_size, storage_dtype, ring_slots) -> None:
    if num_rows < 1 or feature_dim < 1 or batch_size < 1:
        raise RelaError(f"raw bank: num_rows ({num_rows}), feature_dim ({feature_dim}) and batch_size "
                        f"({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise RelaError(f"raw bank: rank {rank} is not in [0, world_size={world_size})")
    if storage_dtype not in _STORAGE:
        raise RelaError(f"raw bank: storage_dtype must be torch.float32 or torch.float16, got {storage_dtype}")
    if ring_slots < 1:
        raise RelaError(f"raw bank: ring_slots must be >= 1, got {ring_slots}")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise RelaError(f"raw bank: key is {len(key.encode())} bytes, at most {_MAX_KEY_BYTES} fit (pass a digest)")
    if world_size > 1:
        if num_rows < world_size:
            raise RelaError(f"raw bank: {num_rows} rows cannot be shared by {world_size} ranks")
        if not (dist.is_available() and dist.is_initialized()):
            raise RelaError(f"raw bank: world_size={world_size} needs torch.distributed initialised by the caller")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RelaError(f"raw bank: rank/world_size {rank}/{world_size} differ from torch.distributed's "
                            f"{dist.get_rank()}/{dist.get_world_size()}")


def _read_header(_C, path: Path) -> dict:
    try:
        return _C.read_bank_header(str(path))
    except RuntimeError as err:
        raise RawBankDamaged(f"raw bank {path} cannot be read as a rela raw bank: {_first_line(err)}; delete it or "
                        "pass rebuild=True") from None


def _check_header(header: dict, path: Path, key: str, num_rows: int, feature_dim: int, dtype_name: str) -> None:
    def mismatch(what: str, stored, wanted) -> RelaError:
        return RawBankDamaged(f"raw bank {path}: {what} mismatch (stored {stored}, wanted {wanted}); delete it or "
                         "pass rebuild=True")

    if not header["header_intact"]:
        raise RawBankDamaged(f"raw bank {path}: checksum mismatch in the header (the header is corrupt); delete it "
                        "or pass rebuild=True")
    stored_key = header["key"].decode(errors="replace")
    if stored_key != key:
        raise mismatch("key", repr(stored_key), repr(key))
    if (header["num_rows"], header["feature_dim"]) != (num_rows, feature_dim):
        raise mismatch("shape", (header["num_rows"], header["feature_dim"]), (num_rows, feature_dim))
    if header["dtype"] != dtype_name:
        raise mismatch("dtype", header["dtype"], dtype_name)
    if header["actual_file_bytes"] < header["file_bytes"]:
        raise mismatch("file size", f"{header['actual_file_bytes']} bytes", f"{header['file_bytes']} (truncated?)")


def _check_output(out: torch.Tensor, batch_size: int, feature_dim: int, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch_size, feature_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RelaError(f"raw bank: the prior returned {shape}, expected ({batch_size}, {feature_dim})")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RelaError(f"raw bank: the prior returned {out.dtype}, expected float32, float16 or bfloat16")
    if out.device.type != device.type:
        raise RelaError(f"raw bank: the prior returned features on {out.device}, expected {device}")


def _memmap(path: Path, header: dict, np_dtype) -> np.ndarray:
    return np.memmap(path, dtype=np_dtype, mode="r", offset=header["data_offset"],
                     shape=(header["num_rows"], header["feature_dim"]))


def _gather(obj, distributed: bool) -> list:
    if not distributed:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_ranks(flag: bool, distributed: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (an all-reduce of the flags' minimum; on `device`, as NCCL needs)."""
    if not distributed:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
