"""A run's saved state: one save/restore pair over one list of what has state, `Run.stateful()` (after dino's
`restart_from_checkpoint(path, run_variables, **objs)`).

A checkpoint holds each of those objects' state dict under its name (the loader's as every rank's list), the
step state (`train_state`, with every rank's `images_seen`), and the options and rank count the run was made
with, so that a resume with other settings is refused. Files, their names and their atomic writes:
rela/utils/checkpoint_files.py and rela/utils/files.py."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from rela.config import TRAJECTORY_OPTIONS, config_to_dict
from rela.errors import RelaError
from rela.run import Run
from rela.utils.checkpoint_files import checkpoint_path
from rela.utils.distributed import barrier, gather_objects
from rela.utils.files import check_archive, cpu_copy, load_plain

# The objects whose state differs between ranks (sampler position, augmentation RNG): every rank's is saved,
# and each rank restores its own. The others are the same on every rank and saved once, from rank 0.
PER_RANK = ("loader",)


def save_checkpoint(run: Run) -> Path:
    """Saves what a run needs to continue exactly: each of `run.stateful()` (the learner with its online,
    target, map and probe, the optimiser, the phase controller, every rank's loader), every rank's image
    count, the step state; and the options and rank count it was made with. `restore_checkpoint` reads
    back each entry. Collective: every rank calls it (the per-rank states are gathered); rank 0 writes."""
    objects = run.stateful()
    per_rank = {name: gather_objects(objects[name].state_dict(), run.dist) for name in PER_RANK}
    images_seen = gather_objects(run.state.images_seen, run.dist)
    path = checkpoint_path(run.run_dir, run.state.step)
    if run.dist.is_main:
        train_state = {**run.state.__dict__, "elapsed_s": run.elapsed_s()}
        states = {name: per_rank[name] if name in per_rank else obj.state_dict() for name, obj in objects.items()}
        state = cpu_copy({**states, "images_seen": images_seen, "train_state": train_state,
                          "config": config_to_dict(run.cfg), "world_size": run.dist.world_size})
        run.checkpoints.submit(state, path, run.run_dir)
    barrier()
    return path


def restore_checkpoint(run: Run, path: Path) -> None:
    """Puts the saved state into a freshly built run; refuses a checkpoint of another trajectory."""
    saved = load_checkpoint(path)
    check_resumable(saved, run, path)
    for name, obj in run.stateful().items():
        obj.load_state_dict(saved[name][run.dist.rank] if name in PER_RANK else saved[name])
    run.state = type(run.state)(**{**saved["train_state"], "images_seen": saved["images_seen"][run.dist.rank]})
    run.segment_start = time.time()


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


def check_resumable(saved: dict, run: Run, path: Path) -> None:
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
    """--data as the folder it names: `data/`, `./data` and `/abs/data` are one folder. --sync-bn's False (what a
    checkpoint from before its recipe-chosen default saved) and None (that default) train alike outside the
    reference recipe, which a changed --recipe catches on its own."""
    if option == "sync_bn" and value is None:
        return False
    return os.path.realpath(value) if option == "data" and isinstance(value, str) else value
