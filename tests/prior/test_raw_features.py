"""The raw bank (rela._C + rela/prior/raw_features.py): rows, sums, sharding, resume after SIGKILL, rejection.

The prior (raw_features_worker.py) is exact by construction, so banks compare bit for bit across batch
sizes, world sizes and resumes, and against a float64 reference within one rounding of the storage dtype.
Multi-rank builds run as separate processes in a gloo group.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.errors import RelaError
from rela.prior.raw_features import build_raw_features, read_bank_state, shard_path

from rela import _C  # noqa: E402  (a missing build must fail here, not skip)

WORKER = Path(__file__).with_name("raw_features_worker.py")
_spec = importlib.util.spec_from_file_location("raw_features_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
KEY = "test-key"
# Largest relative error of a stored row against the float64 reference: one rounding to the storage dtype
# (float16: 2^-11 ~ 4.9e-4; float32: two roundings of 2^-24).
RTOL = {torch.float32: 2e-7, torch.float16: 6e-4}


def bank_rows(raw) -> torch.Tensor:
    return torch.from_numpy(np.array(raw.features)).to(torch.float64)


def assert_rows_match_reference(rows: torch.Tensor, dtype: torch.dtype) -> None:
    reference = worker.reference_rows(rows.shape[0], rows.shape[1])
    relative = ((rows - reference).abs() / reference.abs()).max().item()
    assert relative <= RTOL[dtype], f"max relative error {relative:.3g} > {RTOL[dtype]:.3g}"


def build(path: Path, num_rows: int, feature_dim: int, batch_size: int, **options):
    prior = options.pop("prior", None) or worker.make_prior(feature_dim)
    load = options.pop("load_batch", worker.load_batch)
    options.setdefault("flush_seconds", 0.0)
    return build_raw_features(prior, load, num_rows, feature_dim, path, options.pop("key", KEY),
                              batch_size=batch_size, **options)


class Interrupted(Exception):
    """Stands for whatever stops a build part-way (Ctrl-C, a failing data loader)."""


class CountingPrior:
    """Records the indices it is asked for; can fail after `fail_after` batches."""

    def __init__(self, feature_dim: int, fail_after: int | None = None):
        self.encode = worker.make_prior(feature_dim)
        self.fail_after = fail_after
        self.loaded: list[torch.Tensor] = []

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and len(self.loaded) == self.fail_after:
            raise Interrupted(f"interrupted after {self.fail_after} batches")
        self.loaded.append(indices.clone())
        return worker.load_batch(indices)

    @property
    def indices(self) -> set[int]:
        return set(torch.cat(self.loaded).tolist()) if self.loaded else set()


def run_ranks(path: Path, tmp_path: Path, num_rows: int, feature_dim: int, batch_size: int, world_size: int,
              dtype: str = "float32", fail: dict[int, int] | None = None) -> list[dict]:
    """Builds with `world_size` worker processes in a gloo group; returns what each rank returned.
    fail: {rank: calls}: that rank's prior dies after that many calls, and every rank is expected to fail."""
    # A fresh file store per group: a second group on the first one's file would read its stale addresses.
    store = Path(tempfile.mkdtemp(dir=tmp_path)) / "gloo-store"
    procs = []
    for rank in range(world_size):
        out = tmp_path / f"rank{rank}.npz"
        cmd = [sys.executable, str(WORKER), "--path", str(path), "--num-rows", str(num_rows), "--feature-dim",
               str(feature_dim), "--batch-size", str(batch_size), "--dtype", dtype, "--rank", str(rank),
               "--world-size", str(world_size), "--init-file", str(store), "--out", str(out)]
        if fail and rank in fail:
            cmd += ["--fail-after-calls", str(fail[rank])]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    results = []
    for proc, out in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            raise
        assert (proc.returncode != 0) == bool(fail), output
        results.append(None if fail else dict(np.load(out)))
    return results


# ---------------------------------------------------------------------------------------------- rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,batch_size", [(1, 1), (50, 7), (48, 8), (13, 32)])
def test_bank_rows_equal_prior_output(tmp_path, num_rows, batch_size, dtype):
    raw = build(tmp_path / "bank.raw", num_rows, 24, batch_size, storage_dtype=dtype)
    assert raw.features.shape == (num_rows, 24)
    assert raw.features.dtype == {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    assert not raw.features.flags.writeable
    # Unwritten rows read as 0, which is far from every output (all in [13, 87]).
    assert_rows_match_reference(bank_rows(raw), dtype)
    assert raw.rows_computed == num_rows
    assert read_bank_state(raw.path)["complete"]


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.float16])
def test_low_precision_outputs_are_stored_as_torch_converts_them(tmp_path, output_dtype, storage_dtype):
    prior = worker.make_prior(16, output_dtype=output_dtype)
    raw = build(tmp_path / "bank.raw", 30, 16, 8, prior=prior, storage_dtype=storage_dtype)
    expected = prior(worker.load_batch(torch.arange(30))).to(storage_dtype).to(torch.float64)
    torch.testing.assert_close(bank_rows(raw), expected, rtol=0, atol=0)


def test_prior_output_of_wrong_shape_is_rejected(tmp_path):
    with pytest.raises(RelaError, match=r"returned \(4, 15\), expected \(4, 16\)"):
        build(tmp_path / "bank.raw", 10, 16, 4, prior=lambda x: worker.make_prior(15)(x))


# ---------------------------------------------------------------------------------------------- sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,batch_size", [(50, 7), (64, 16)])
def test_row_sums_equal_float64_reference(tmp_path, num_rows, batch_size, dtype):
    raw = build(tmp_path / "bank.raw", num_rows, 20, batch_size, storage_dtype=dtype)
    rows = bank_rows(raw)  # the stored values: the sums are of what the bank holds
    assert raw.row_count == num_rows
    assert raw.row_sum.dtype == raw.row_outer_sum.dtype == torch.float64
    torch.testing.assert_close(raw.row_sum, rows.sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(raw.row_outer_sum, rows.T @ rows, rtol=1e-12, atol=0)


def test_complete_bank_is_reused_without_running_the_prior(tmp_path):
    first = build(tmp_path / "bank.raw", 40, 12, 6)

    def no_prior(_):
        raise AssertionError("the prior ran on a complete bank")

    progress = []
    again = build(tmp_path / "bank.raw", 40, 12, 6, prior=no_prior, load_batch=no_prior,
                  progress=lambda done, total: progress.append((done, total)))
    assert again.rows_computed == 0
    np.testing.assert_array_equal(np.array(again.features), np.array(first.features))
    torch.testing.assert_close(again.row_sum, first.row_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(again.row_outer_sum, first.row_outer_sum, rtol=1e-12, atol=0)
    assert progress[-1] == (40, 40)


def test_progress_counts_rows_up_to_the_shard(tmp_path):
    calls = []
    build(tmp_path / "bank.raw", 23, 8, 5, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 23) and calls[-1] == (23, 23)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) == 1 + math.ceil(23 / 5)


@pytest.mark.parametrize("flush_seconds", [0.5, 60.0])
def test_rows_are_flagged_on_the_flush_timer_while_the_prior_runs(tmp_path, flush_seconds):
    path = tmp_path / "bank.raw"
    flagged = []

    def progress(done, total):
        if 0 < done < total:
            flagged.append(read_bank_state(path)["rows_done"])

    # Batches every 0.3 s: with a 0.5 s timer the writer flags rows between batches, not only at the end.
    build(path, 20, 8, 4, prior=worker.make_prior(8, delay=0.3), flush_seconds=flush_seconds, progress=progress)
    if flush_seconds < 1:
        assert flagged[-1] >= 4
    else:
        assert flagged == [0, 0, 0, 0]
    assert read_bank_state(path)["rows_done"] == 20


# ---------------------------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("num_rows,batch_size,dtype", [(40, 4, "float32"), (37, 5, "float16")])
def test_two_ranks_write_one_shard_file_each(tmp_path, num_rows, batch_size, dtype):
    """No file is written by two processes (NFS keeps no coherence between two nodes' mappings of one file):
    each rank writes and finalises its own shard file, which holds exactly its rows."""
    path = tmp_path / "bank.raw"
    results = run_ranks(path, tmp_path, num_rows, 16, batch_size, world_size=2, dtype=dtype)
    storage = getattr(torch, dtype)
    assert not path.exists()
    assert [int(r["first_row"]) for r in results] == [_C.shard_range(num_rows, r, 2)[0] for r in range(2)]
    rows = torch.cat([torch.from_numpy(r["complete_rows"]) for r in results])
    assert_rows_match_reference(rows, storage)
    for rank, result in enumerate(results):
        begin, end = _C.shard_range(num_rows, rank, 2)
        state = read_bank_state(shard_path(path, rank, 2))
        assert state["complete"] and state["num_rows"] == end - begin
        shard = rows[begin:end]
        assert int(result["row_count"]) == end - begin
        # Each rank computed its own shard, in static batches (padding repeats a shard index).
        assert set(result["loaded"].tolist()) == set(range(begin, end))
        assert int(result["batches"]) == math.ceil((end - begin) / batch_size)
        torch.testing.assert_close(torch.from_numpy(result["row_sum"]), shard.sum(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.from_numpy(result["row_outer_sum"]), shard.T @ shard, rtol=1e-12, atol=0)
    assert sum(int(r["row_count"]) for r in results) == num_rows


def test_two_ranks_reuse_a_complete_bank_without_running_the_prior(tmp_path):
    path = tmp_path / "bank.raw"
    first = build(path, 33, 16, 4)
    results = run_ranks(path, tmp_path, 33, 16, 4, world_size=2)
    rows = bank_rows(first)
    for rank, result in enumerate(results):
        begin, end = _C.shard_range(33, rank, 2)
        assert int(result["rows_computed"]) == 0 and int(result["batches"]) == 0
        assert int(result["row_count"]) == end - begin
        torch.testing.assert_close(torch.from_numpy(result["row_outer_sum"]), rows[begin:end].T @ rows[begin:end],
                                   rtol=1e-12, atol=0)


def test_interrupted_two_rank_build_resumes_without_recomputing(tmp_path):
    """Rank 1 dies after three batches of its shard (rank 0 finishes its own, then fails in the all-reduce
    that agrees on completion); run again, rank 0 reuses its shard and rank 1 computes only what is missing."""
    path = tmp_path / "bank.raw"
    run_ranks(path, tmp_path, 45, 16, 4, world_size=2, fail={1: 3})
    begin1 = _C.shard_range(45, 1, 2)[0]
    state0, state1 = read_bank_state(shard_path(path, 0, 2)), read_bank_state(shard_path(path, 1, 2))
    assert state0["complete"] and not state1["complete"] and state1["rows_done"] == 12
    results = run_ranks(path, tmp_path, 45, 16, 4, world_size=2)
    assert int(results[0]["rows_computed"]) == 0 and int(results[0]["batches"]) == 0
    assert set(results[1]["loaded"].tolist()) == set(range(begin1 + 12, 45))
    rows = torch.cat([torch.from_numpy(r["complete_rows"]) for r in results])
    assert_rows_match_reference(rows, torch.float32)
    # Sums cover the whole shard: rows read back from the file plus rows computed now.
    total = sum(torch.from_numpy(r["row_outer_sum"]) for r in results)
    torch.testing.assert_close(total, rows.T @ rows, rtol=1e-12, atol=0)


def test_shard_plan_batches_cover_each_pending_row_once(tmp_path):
    path = tmp_path / "bank.raw"
    prior = CountingPrior(8, fail_after=2)
    with pytest.raises(Interrupted):
        build(path, 53, 8, 5, prior=prior.encode, load_batch=prior.load_batch)
    bank = _C.BankFile(str(path))
    done = bank.done_flags().bool()
    assert done.sum().item() == 10
    for world_size in (1, 2, 3, 7):
        covered = []
        for rank in range(world_size):
            plan = _C.ShardPlan(bank, rank, world_size, 4)
            assert (plan.shard_begin, plan.shard_end) == _C.shard_range(53, rank, world_size)
            for b in range(plan.num_batches):
                indices, valid = plan.batch(b)
                assert indices.shape == (4,) and indices.dtype == torch.int64 and 1 <= valid <= 4
                assert (indices[valid:] == indices[valid - 1]).all()  # padding repeats the last row
                assert ((plan.shard_begin <= indices) & (indices < plan.shard_end)).all()
                covered += indices[:valid].tolist()
        assert sorted(covered) == [i for i in range(53) if not done[i]]


# ---------------------------------------------------------------------------------------------- kill


def test_killed_build_resumes_to_the_same_bank(tmp_path):
    num_rows, dim, batch = 48, 16, 5
    path = tmp_path / "killed.raw"
    cmd = [sys.executable, str(WORKER), "--path", str(path), "--num-rows", str(num_rows), "--feature-dim", str(dim),
           "--batch-size", str(batch), "--pause-after-calls", "2", "--flush-seconds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The worker pauses before its third batch, the first two written and flushed: no timing window.
        deadline = time.monotonic() + 300
        while not (path.exists() and read_bank_state(path)["rows_done"] >= 2 * batch):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = read_bank_state(path)
    assert not state["complete"] and 2 * batch <= state["rows_done"] < num_rows
    done_before = set(np.flatnonzero(_C.BankFile(str(path)).done_flags().numpy()).tolist())

    prior = CountingPrior(dim)
    resumed = build(path, num_rows, dim, batch, prior=prior.encode, load_batch=prior.load_batch)
    pending = num_rows - len(done_before)
    assert resumed.rows_computed == pending
    assert len(prior.loaded) == math.ceil(pending / batch)
    assert prior.indices.isdisjoint(done_before)

    uninterrupted = build(tmp_path / "straight.raw", num_rows, dim, batch)
    np.testing.assert_array_equal(np.array(resumed.features), np.array(uninterrupted.features))
    torch.testing.assert_close(resumed.row_outer_sum, uninterrupted.row_outer_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(resumed.row_sum, uninterrupted.row_sum, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- rejection


@pytest.fixture(scope="module")
def complete_bank(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("complete") / "bank.raw"
    build(path, 30, 12, 8)
    return path


def corrupt_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ 0x5A]))


@pytest.mark.parametrize("which", ["key", "rows", "dim", "dtype", "checksum", "header"])
def test_mismatched_bank_is_rejected_naming_what_differs(tmp_path, complete_bank, which):
    path = tmp_path / "bank.raw"
    shutil.copyfile(complete_bank, path)
    options = dict(num_rows=30, feature_dim=12)
    expected = {"key": "key mismatch", "rows": "shape mismatch", "dim": "shape mismatch", "dtype": "dtype mismatch",
                "checksum": "checksum mismatch", "header": "checksum mismatch in the header"}[which]
    if which == "key":
        options["key"] = "another-key"
    elif which == "rows":
        options["num_rows"] = 31
    elif which == "dim":
        options["feature_dim"] = 13
    elif which == "dtype":
        options["storage_dtype"] = torch.float16
    elif which == "checksum":
        corrupt_byte(path, read_bank_state(path)["data_offset"] + 17 * 12 * 4 + 5)
    else:
        corrupt_byte(path, 128 + 2)  # inside the stored key

    def no_prior(_):
        raise AssertionError("the prior ran on a rejected bank")

    with pytest.raises(RelaError, match=expected) as error:
        build(path, options.pop("num_rows"), options.pop("feature_dim"), 8, prior=no_prior, load_batch=no_prior,
              **options)
    assert str(path) in str(error.value)

    rebuilt = build(path, 30 + (which == "rows"), 12 + (which == "dim"), 8, rebuild=True, **options)
    assert read_bank_state(path)["complete"]
    assert rebuilt.rows_computed == rebuilt.features.shape[0]


def test_partial_bank_of_another_key_is_rejected(tmp_path):
    path = tmp_path / "bank.raw"
    prior = CountingPrior(8, fail_after=1)
    with pytest.raises(Interrupted):
        build(path, 20, 8, 4, prior=prior.encode, load_batch=prior.load_batch)
    with pytest.raises(RelaError, match="key mismatch"):
        build(path, 20, 8, 4, key="other")


def test_file_that_is_not_a_bank_is_rejected(tmp_path):
    path = tmp_path / "bank.raw"
    path.write_bytes(b"not a bank" * 1000)
    with pytest.raises(RelaError, match="not a rela raw bank"):
        build(path, 20, 8, 4)


def test_missing_extension_raises_rela_error_telling_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rela._C", None)  # makes `import rela._C` fail
    with pytest.raises(RelaError, match=r"pip install --no-build-isolation -e \."):
        build(tmp_path / "bank.raw", 10, 8, 4)


# ---------------------------------------------------------------------------------------------- checksum


def test_xxh64_matches_reference_vectors():
    assert _C.xxh64(b"", 0) == 0xEF46DB3751D8E999
    assert _C.xxh64(b"a", 0) == 0xD24EC4F1A98C6E5B
    assert _C.xxh64(b"abc", 0) == 0x44BC2CF5AD770999


def test_checksum_is_chunked_xxh64_and_independent_of_threads(tmp_path):
    # 2600 rows of 1024 float32 = 10.2 MiB: three 4 MiB chunks, the last one partial.
    raw = build(tmp_path / "bank.raw", 2600, 1024, 512, flush_seconds=1.0)
    data = np.array(raw.features).tobytes()
    chunk = 4 << 20
    chunk_hashes = np.array([_C.xxh64(data[i:i + chunk], i // chunk) for i in range(0, len(data), chunk)],
                            dtype="<u8")
    expected = _C.xxh64(chunk_hashes.tobytes(), len(data))
    bank = _C.BankFile(str(raw.path))
    assert [bank.checksum(threads) for threads in (1, 2, 5)] == [expected] * 3
    assert read_bank_state(raw.path)["checksum"] == expected
