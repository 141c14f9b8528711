"""A truncated or bit-flipped latest checkpoint: `--resume auto` names it and resumes from the one before.
A bit-flipped target bank: its checksum catches it; a cached bank is rebuilt, a given one refused."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from fault_runs import ARGS, assert_ends_like
from rela.errors import RelaError
from rela.prior.raw_features import read_bank_state
from rela.train import main
from rela.utils.checkpoint_files import latest_intact_checkpoint


def flip_a_byte_of_the_largest_tensor(path: Path) -> None:
    """Inverts one byte in the middle of the biggest tensor's data: the file still unzips and unpickles."""
    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
        with archive.open(member) as fh:  # find the data's offset in the file from the member's header
            fh.read(1)
            start = fh._fileobj.tell() - 1  # noqa: SLF001 (zipfile's own stream over the file)
    data = bytearray(path.read_bytes())
    data[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_of_finished_run(uninterrupted: Path, tmp_path: Path) -> Path:
    """The uninterrupted run's folder as a killed run would leave it: checkpoints at 12 and 16, no results."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    (out / "backbone.pt").unlink()
    return out


def test_a_flipped_byte_in_the_latest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
        tmp_path, uninterrupted, capsys):
    """torch.load would read this file without complaint: the archive's CRC-32s catch it."""
    out = copy_of_finished_run(uninterrupted, tmp_path)
    latest = out / "checkpoints" / "ckpt-000000016.pt"
    flip_a_byte_of_the_largest_tensor(latest)
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out), "--resume", "auto"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: {latest} is damaged: its member " in err and "fails its CRC-32 check" in err, err[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'ckpt-000000012.pt'} at step 12" in err
    assert_ends_like(out, uninterrupted)


def test_a_truncated_latest_checkpoint_is_named_and_passed_over_and_none_intact_is_an_error(tmp_path,
                                                                                            uninterrupted):
    out = copy_of_finished_run(uninterrupted, tmp_path)
    latest, before = (out / "checkpoints" / f"ckpt-0000000{s}.pt" for s in (16, 12))
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    warnings = []
    assert latest_intact_checkpoint(out, warn=warnings.append) == before
    assert warnings == [f"warning: {latest} is damaged (truncated or not a torch file: File is not a zip file); "
                        "trying the checkpoint before it"]
    before.write_bytes(b"")
    with pytest.raises(RelaError, match=r"no intact checkpoint in .*checkpoints: all 2 are damaged"):
        latest_intact_checkpoint(out, warn=warnings.append)


def test_a_flipped_byte_in_a_bank_is_caught_a_cached_bank_rebuilt_and_a_given_bank_refused(
        tmp_path, uninterrupted, capsys):
    banks = tmp_path / "banks"
    shutil.copytree(uninterrupted.parent / "banks", banks)
    [bank] = banks.glob("bank-*.pt")
    [raw] = banks.glob("raw-*.bank")
    good = torch.load(bank, weights_only=True)["targets"]
    flip_a_byte_of_the_largest_tensor(bank)

    given = [*ARGS, "--target-bank", str(bank), "--bank-dir", str(banks), "--out", str(tmp_path / "given")]
    assert main(given) == 1
    err = capsys.readouterr().err
    assert f"rela.train: error: cannot read target bank {bank}: {bank} is damaged: its member " in err, err[-3000:]
    assert "fails its CRC-32 check" in err

    # The cached bank and, under it, the raw pass's file: both damaged, both rebuilt.
    header = read_bank_state(raw)
    data = bytearray(raw.read_bytes())
    data[header["data_offset"] + 1000] ^= 0xFF
    raw.write_bytes(bytes(data))
    cached = [*ARGS, "--bank-dir", str(banks), "--out", str(tmp_path / "cached"), "--stop-after-steps", "1"]
    assert main(cached) == 0
    err = capsys.readouterr().err
    assert f"target bank: cannot read target bank {bank}: {bank} is damaged" in err and "rebuilding it" in err
    assert f"target bank: raw bank {raw}: checksum mismatch" in err, err[-3000:]
    assert torch.equal(torch.load(bank, weights_only=True)["targets"], good)
