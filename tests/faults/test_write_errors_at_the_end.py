"""A full disk at the end of a run (backbone.pt, backbone.safetensors, summary.json) and a read-only --out:
one line naming the file, exit 1 (before: a traceback); the checkpoints stay, so --resume auto finishes."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from fault_runs import ARGS, assert_ends_like
from rela.train import main


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("rela.train: error:")]


@pytest.mark.parametrize("name", ["backbone.pt", "backbone.safetensors", "summary.json"])
def test_disk_full_at_a_result_file_names_it_and_a_resume_writes_it(tmp_path, uninterrupted, monkeypatch, capsys,
                                                                    name):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)  # training done: a resume only evaluates and writes the results
    for result in ("summary.json", "backbone.pt", "backbone.safetensors"):
        (out / result).unlink()
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out), "--resume", "auto"]
    monkeypatch.setenv("RELA_FAIL_WRITE", f"{name}:ENOSPC")
    assert main(args) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"rela.train: error: cannot write {out / name}: No space left on device (errno 28); the run's "
                     "checkpoints are intact: --resume auto evaluates again and writes it"]
    assert not (out / "summary.json").exists()
    monkeypatch.delenv("RELA_FAIL_WRITE")
    assert main(args) == 0
    assert_ends_like(out, uninterrupted)


def test_a_read_only_out_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """The tests run as root, for whom chmod does not make a folder read-only: the file system's answer
    (EROFS) is given by os.open and os.mkdir for paths in the folder, as a read-only mount gives it."""
    out = tmp_path / "ro"
    out.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return Path(os.fsdecode(path)).resolve().is_relative_to(out.resolve())

    def read_only_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_mkdir(path, *args, **kwargs):
        if refused(path):
            code = errno.EEXIST if Path(path).exists() else errno.EROFS
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    for where in (out, out / "new"):
        assert main([*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(where)]) == 1
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"rela.train: error: cannot write the run folder {where}: ")
        assert lines[0].endswith("(errno 30)"), lines
