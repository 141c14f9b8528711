"""A full or read-only disk during a checkpoint or bank write: one clear line, exit 1, and what was on disk
before (the previous checkpoint, the previous bank) intact. The error is raised in the write path itself
(RELA_FAIL_WRITE, after half the file's bytes), as a real ENOSPC or EROFS would be."""
from __future__ import annotations

import shutil

from fault_runs import ARGS
from rela.train import main
from rela.checkpoint import load_checkpoint
from rela.utils.checkpoint_files import latest_checkpoint


def test_disk_full_during_a_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, uninterrupted,
                                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out), "--resume", "auto"]
    monkeypatch.setenv("RELA_FAIL_WRITE", "ckpt-000000008.pt:ENOSPC")
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rela.train: error:")]
    assert lines == [f"rela.train: error: cannot write checkpoint {out / 'checkpoints' / 'ckpt-000000008.pt'}: "
                     f"No space left on device (errno 28); the previous checkpoint "
                     f"{out / 'checkpoints' / 'ckpt-000000004.pt'} is intact"], err[-3000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000000004.pt"]  # no torn temp file
    assert load_checkpoint(out / "checkpoints" / "ckpt-000000004.pt")["train_state"]["step"] == 4


def test_read_only_disk_during_a_bank_write_names_the_file_and_keeps_the_previous_bank(tmp_path, uninterrupted,
                                                                                      monkeypatch, capsys):
    banks = tmp_path / "banks"
    shutil.copytree(uninterrupted.parent / "banks", banks)
    [bank] = banks.glob("bank-*.pt")
    before = bank.read_bytes()
    monkeypatch.setenv("RELA_FAIL_WRITE", "bank-*.pt:EROFS")
    # another prior seed: another key for the same file, so the bank is rebuilt and written over the old one
    assert main([*ARGS, "--prior-seed", "1", "--bank-dir", str(banks), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"rela.train: error: cannot write target bank {bank}: Read-only file system (errno 30); the bank file " \
           "there before is intact" in err, err[-3000:]
    assert "Traceback" not in err
    assert bank.read_bytes() == before
    assert not [p.name for p in banks.iterdir() if p.name.startswith(".bank")], "a lock or temporary file is left"
    assert latest_checkpoint(tmp_path / "run") is None
