"""A run's saved state: the one list of what a checkpoint holds, and the one save/restore pair.

Writes are atomic: a temporary file beside the target, fsync, rename, fsync of the folder. A crash at
any point leaves either the old file or the new one, never a torn one; a write that fails (a full or
read-only disk) leaves the old one and stops the run with an error naming the file.

Reads trust nothing: a checkpoint, a target bank or a `run:` prior may come from someone else, so files
are loaded with torch's weights-only unpickler (tensors and plain data; a file that asks for any other
Python object is refused before anything runs), after the zip archive's CRC-32s are checked (a torn
or bit-flipped file is named, not half-loaded)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from rela.config import TRAJECTORY_OPTIONS, config_to_dict
from rela.errors import RelaError
from rela.utils.distributed import barrier, gather_objects
from rela.utils.faults import kill_point, write_fault

if TYPE_CHECKING:  # rela.run imports this module
    from rela.run import Run


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if (fault := write_fault(path)) is not None:  # tests: a disk that fills half-way
                fh.write(data[: len(data) // 2])
                raise fault
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        kill_point("write", path.name)  # tests: a death between the complete temporary file and the rename
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


@contextmanager
def write_errors_named(path: str | Path, after: str = "") -> Iterator[None]:
    """A failed write in the block (a full or read-only disk: OSError) stops the run with one line naming
    `path` and the error, and `after` (what is still intact, what to do)."""
    try:
        yield
    except OSError as err:
        raise RelaError(f"cannot write {path}: {err.strerror or err} (errno {err.errno})"
                        + (f"; {after}" if after else "")) from None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}.pt"


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: Path, warn) -> Path | None:
    """The newest checkpoint whose archive is whole (`check_archive`); each damaged newer one is named
    through `warn(message)` and passed over: a run resumes from the one before rather than not at all.
    None for a folder without checkpoints (a fresh run); RelaError if every one is damaged."""
    found = _checkpoints(run_dir)
    for path in reversed(found):
        try:
            check_archive(path)
            return path
        except RelaError as err:
            warn(f"warning: {err}; trying the checkpoint before it")
    if found:
        raise RelaError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(found)} are damaged")
    return None


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    """Keeps the newest `keep` checkpoints; removes temporary files that a killed writer left behind."""
    for p in _checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)
    for p in (Path(run_dir) / "checkpoints").glob(".ckpt-*.pt.tmp-*"):
        if p.name.rsplit("-", 1)[1] != str(os.getpid()):
            p.unlink(missing_ok=True)


def check_archive(path: Path) -> None:
    """RelaError naming `path` unless it is a whole zip archive (torch.save's format) whose every member
    matches its CRC-32: catches a truncated file and a flipped byte, which torch.load may read silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        raise RelaError(f"{path} is damaged (truncated or not a torch file: {err})") from None
    if bad is not None:
        raise RelaError(f"{path} is damaged: its member {bad} fails its CRC-32 check (a corrupted byte)")


def load_plain(path: Path, mmap: bool = False) -> Any:
    """torch.load of a file that may come from someone else: tensors and plain data (dict, list, tuple,
    str, numbers, None) only. A file that asks the unpickler for any other object (a crafted one can name
    a function to call) raises RelaError before anything runs; the caller adds which file it was.
    mmap=True: the tensors are mapped from the file, not read into memory (a target bank of several GB)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise RelaError("refused: it holds Python objects other than tensors and plain data, and loading it "
                        f"could run code (it asks the unpickler for {asked.group(1) if asked else 'other objects'})"
                        ) from None


def load_checkpoint(path: Path) -> dict:
    check_archive(path)
    try:
        saved = load_plain(path)
    except RelaError as err:
        raise RelaError(f"cannot load checkpoint {path}: {err}") from None
    except Exception as err:  # a foreign file: name it rather than show a pickle traceback
        raise RelaError(f"cannot load checkpoint {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(saved, dict) or "train_state" not in saved:
        raise RelaError(f"cannot load checkpoint {path}: not a checkpoint written by rela.train")
    return saved


def save_checkpoint(run: "Run") -> Path:
    """Saves what a run needs to continue exactly: the learner (online, target, map, probe), the optimiser,
    the phase controller, every rank's loader (sampler and augmentation RNG) and image count, the step state; and the
    options and rank count it was made with. `restore_checkpoint` reads back each entry.
    Collective: every rank calls it (the loaders' states are gathered); rank 0 writes."""
    loader_states = gather_objects(run.loader.state_dict(), run.dist)
    images_seen = gather_objects(run.state.images_seen, run.dist)
    path = checkpoint_path(run.run_dir, run.state.step)
    if run.dist.is_main:
        train_state = {**run.state.__dict__, "elapsed_s": run.elapsed_s()}
        state = cpu_copy({"learner": run.learner.state_dict(), "optimizer": run.optimizer.state_dict(),
                          "controller": run.controller.state_dict(), "loader": loader_states,
                          "images_seen": images_seen, "train_state": train_state, "config": config_to_dict(run.cfg),
                          "world_size": run.dist.world_size})
        run.checkpoints.submit(state, path, run.run_dir)
    barrier()
    return path


def cpu_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU, in storage of its own: a snapshot that later steps do not
    change (the EMA's views into flat buffers become plain tensors that torch.save can write)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, from snapshots on the CPU: the step that
    asked goes on while the file is serialised, fsynced and renamed, and the old ones pruned. `wait()`
    returns once the last one is on disk, and raises what its write raised."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rela-checkpoint")
        self._pending: Future | None = None
        self.last_submitted = time.time()  # the run's start, before any checkpoint

    def submit(self, state: dict, path: Path, run_dir: Path) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, state, path, run_dir)
        self.last_submitted = time.time()

    @staticmethod
    def _write(state: dict, path: Path, run_dir: Path) -> None:
        previous = latest_checkpoint(run_dir)
        try:
            atomic_torch_save(state, path)
        except OSError as err:  # a full or read-only disk: the run stops; what was on disk stays
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
            raise RelaError(f"cannot write checkpoint {path}: {err.strerror or err} (errno {err.errno}); "
                            f"{kept}") from None
        prune_checkpoints(run_dir)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def restore_checkpoint(run: "Run", path: Path) -> None:
    """Puts the saved state into a freshly built run; refuses a checkpoint of another trajectory."""
    saved = load_checkpoint(path)
    check_resumable(saved, run, path)
    run.learner.load_state_dict(saved["learner"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.controller.load_state_dict(saved["controller"])
    run.loader.load_state_dict(saved["loader"][run.dist.rank])
    run.state = type(run.state)(**{**saved["train_state"], "images_seen": saved["images_seen"][run.dist.rank]})
    run.segment_start = time.time()


def check_resumable(saved: dict, run: "Run", path: Path) -> None:
    """A resumed run continues the same trajectory: same options that shape it, same number of ranks."""
    before, now = saved.get("config", {}), config_to_dict(run.cfg)
    # An option newer than the checkpoint had its default's behaviour when the checkpoint was written.
    added = {f.name: f.default for f in dataclasses.fields(run.cfg) if f.name not in before}
    before = {**added, **before}
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in TRAJECTORY_OPTIONS
               if _comparable(k, before.get(k)) != _comparable(k, now[k])]
    if saved.get("world_size", 1) != run.dist.world_size:
        changed.append(f"ranks {saved.get('world_size', 1)} -> {run.dist.world_size}")
    if changed:
        raise RelaError(f"cannot resume {path} with other settings: {'; '.join(changed)}")


def _comparable(option: str, value: Any) -> Any:
    """--data as the folder it names: `data/`, `./data` and `/abs/data` are one folder."""
    return os.path.realpath(value) if option == "data" and isinstance(value, str) else value
