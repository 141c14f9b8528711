"""Atomic writes: a temporary file beside the target, fsync, rename, fsync of the folder. A crash at
any point leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from rela.errors import RelaError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
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


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    folder = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: name it rather than show a pickle traceback
        raise RelaError(f"cannot load checkpoint {path}: {err}") from None


def standalone_state_dict(module) -> dict:
    """state_dict() with each tensor in storage of its own. The EMA keeps parameters and buffers as views
    into shared flat buffers (buffers of mixed dtypes share one int64 word buffer), which torch.save
    cannot serialise as they are."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
