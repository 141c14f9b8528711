"""What a cluster run meets before training: a mount without file locks, a collective timeout that must outlast a
bank build, a torchrun restart without --resume, a bank of 1.28M rows that must fit beside the model."""
from __future__ import annotations

import datetime
import errno
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from builders import FAST_ARGS
from rela.options import parse_config
from rela.train import main
from rela.utils import distributed as dist_utils
from rela.utils import locks
from rela.utils.locks import FileLock, lock_run_folder

_spec = importlib.util.spec_from_file_location(
    "bank_build_worker", Path(__file__).resolve().parents[1] / "prior" / "bank_build_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_mount_without_locks_warns_once_and_goes_on_unlocked(tmp_path, monkeypatch, code):
    def no_locks(fd, flags):
        raise OSError(code, "no locks here")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    said = []
    lock = FileLock(tmp_path / "bank.lock", warn=said.append)
    assert lock.try_acquire() and lock.unlocked
    assert len(said) == 1 and f"cannot lock {tmp_path / 'bank.lock'}: no locks here (errno {code}" in said[0]
    lock.release()
    assert not (tmp_path / "bank.lock").exists()
    assert lock_run_folder(tmp_path / "run", dist_utils.DistInfo()) is not None  # the run folder's lock too


def test_other_lock_errors_still_raise(tmp_path, monkeypatch):
    def broken(fd, flags):
        raise OSError(errno.EBADF, "bad file descriptor")

    monkeypatch.setattr(locks.fcntl, "flock", broken)
    with pytest.raises(OSError):
        FileLock(tmp_path / "x.lock").acquire()


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    assert parse_config(FAST_ARGS).dist_timeout == 1800.0  # NCCL's own default, 600 s, is too short for a bank
    assert parse_config([*FAST_ARGS, "--dist-timeout", "42"]).dist_timeout == 42.0
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 1, 2)]))
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    info = dist_utils.init_distributed("cpu", 42.0)
    assert info.rank == 1 and info.world_size == 2
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=42)


def test_dist_timeout_out_of_range_is_one_line(capsys):
    assert main([*FAST_ARGS, "--dist-timeout", "0"]) != 0
    assert "--dist-timeout" in capsys.readouterr().err


def test_a_torchrun_restart_without_resume_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*FAST_ARGS, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("rela.train: error: torchrun restarted this run (attempt 2, --max-restarts) but --resume "
                           "is not set: pass --resume auto so a restarted attempt continues from the last checkpoint")
    assert not (tmp_path / "run").exists()


def test_the_bank_keeps_bf16_targets_written_to_the_file_and_mapped_back(tmp_path, monkeypatch):
    from rela.prior import target_bank

    built = worker.build_bank(tmp_path, dist_utils.DistInfo())
    assert built.targets.dtype == torch.bfloat16 and not built.reused
    assert built.key["targets_dtype"] == "bfloat16"
    [path] = tmp_path.glob("bank-*.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["targets"].dtype == torch.bfloat16 and torch.equal(saved["targets"], built.targets)

    calls = []
    real_load = target_bank.load_plain
    monkeypatch.setattr(target_bank, "load_plain", lambda p, mmap=False: calls.append(mmap) or real_load(p, mmap=mmap))
    monkeypatch.setattr(target_bank, "atomic_torch_save", None, raising=False)  # the in-memory buffer is not used
    reused = worker.build_bank(tmp_path, dist_utils.DistInfo())
    assert reused.reused and calls == [True] and torch.equal(reused.targets, built.targets)


def test_bank_save_streams_to_a_file_not_a_buffer(tmp_path, monkeypatch):
    from rela.prior import target_bank

    targets = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: targets.append(f) or real_save(obj, f, *a, **k))
    target_bank._save_bank({"targets": torch.zeros(3, 2, dtype=torch.bfloat16)}, tmp_path / "bank.pt")
    assert len(targets) == 1 and hasattr(targets[0], "fileno")  # an open file, not io.BytesIO
    assert torch.load(tmp_path / "bank.pt", weights_only=True)["targets"].dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]
