"""Files written atomically and read without trust.

Writes are atomic: a temporary file beside the target, fsync, rename, fsync of the folder. A crash at
any point leaves either the old file or the new one, never a torn one; a write that fails (a full or
read-only disk) leaves the old one and stops the run with an error naming the file.

Reads trust nothing: a checkpoint, a target bank or a `run:` prior may come from someone else, so files
are loaded with torch's weights-only unpickler (tensors and plain data; a file that asks for any other
Python object is refused before anything runs), after the zip archive's CRC-32s are checked (a torn
or bit-flipped file is named, not half-loaded)."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from rela.errors import RelaError
from rela.utils.faults import kill_point, write_fault


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
