"""The run folder (--out) as a user may hand it over: full of someone else's files, inside the data, left by
a run killed before its first checkpoint or in the middle of a metrics row, or named another way on resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from builders import FAST_ARGS, write_cifar10, write_imagefolder
from fault_runs import ARGS, assert_ends_like, metric_steps, train_process
from rela.train import main
from rela.utils.checkpoint_files import latest_checkpoint


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("rela.train: error:")]


def test_a_folder_of_foreign_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    """Before: config.json, summary.json and backbone.pt were written over the folder's own, and metrics.jsonl
    appended to."""
    out = tmp_path / "thesis"
    out.mkdir()
    theirs = {"config.json": '{"lr": 0.1, "model": "mine"}\n', "metrics.jsonl": '{"epoch": 1}\n', "notes.txt": "x"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    for resume in ([], ["--resume", "auto"]):  # a first --resume auto starts afresh: refused alike
        assert main([*FAST_ARGS, "--prior", "none", "--out", str(out), "--bank-dir", str(tmp_path / "banks"),
                     *resume]) == 1
        [line] = error_lines(capsys.readouterr().err)
        assert line == (f"rela.train: error: --out {out} is not empty and is not a run folder of rela.train (it "
                        "holds config.json (not a config of rela.train), metrics.jsonl, notes.txt): pass a new or "
                        "empty folder")
    assert {p.name: p.read_text() for p in out.iterdir()} == theirs


def test_out_inside_the_data_folder_is_refused(tmp_path, capsys):
    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=4)
    args = [*FAST_ARGS, "--dataset", "imagefolder", "--data", f"{tree}/", "--prior", "none"]
    assert main([*args, "--out", str(tree / "runs" / "a"), "--bank-dir", str(tmp_path / "banks")]) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line == (f"rela.train: error: --out {tree / 'runs' / 'a'} is inside the data folder {tree}/: the run's "
                    "files would be read as data; pass an --out outside it")
    assert not (tree / "runs").exists()


def test_a_torn_last_metrics_row_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, uninterrupted, capsys):
    """Before: every resume failed with a JSONDecodeError traceback."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 19, "epoch": 2, "phase": "by')  # the row a killed process was writing
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out), "--resume", "auto"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'metrics.jsonl'}: its last line is torn" in err, err[-3000:]
    assert_ends_like(out, uninterrupted)


def test_a_kill_before_the_first_checkpoint_then_resume_logs_each_row_once(tmp_path, uninterrupted):
    """Before: the restarted run appended its rows 1-3 after the killed attempt's rows 1-3."""
    out = tmp_path / "run"
    args = [*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out), "--resume", "auto"]
    killed = train_process(*args, faults={"RELA_KILL_AT": "after-step:3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert latest_checkpoint(out) is None and metric_steps(out) == [3]
    assert main(args) == 0
    assert_ends_like(out, uninterrupted)  # metric steps included


def test_resume_accepts_the_data_folder_spelled_another_way(tmp_path, capsys, monkeypatch):
    """Before: `--data cifar/` (or a relative path) after `--data /abs/cifar` was refused as another trajectory."""
    cifar = write_cifar10(tmp_path / "cifar", per_batch=20)
    monkeypatch.chdir(tmp_path)
    args = [*FAST_ARGS, "--dataset", "cifar10", "--prior", "none", "--budget", "0.5", "--out", str(tmp_path / "run"),
            "--bank-dir", str(tmp_path / "banks"), "--probe-epochs", "1", "--no-monitor"]
    assert main([*args, "--data", str(cifar), "--stop-after-steps", "1"]) == 0
    for spelling, stop in ((f"{cifar}/", "2"), ("cifar", "3"), ("./cifar/", "4")):
        assert main([*args, "--data", spelling, "--resume", "auto", "--stop-after-steps", stop]) == 0, spelling
        err = capsys.readouterr().err
        assert f"at step {int(stop) - 1}" in err and "error" not in err, err[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == "./cifar/"


def test_only_rank_zero_judges_the_run_folder(tmp_path, monkeypatch):
    """Before: every rank looked at --out for itself, and rank 1 could find rank 0's write probe
    (.write-test-PID) there, call the folder foreign and stop the run (it failed CI that way). Rank 1 now takes
    rank 0's answer, whatever the folder holds when it looks."""
    from rela.config import Config
    from rela.train import _run_folder
    from rela.utils import distributed as dist_utils

    out = tmp_path / "run"
    out.mkdir()
    (out / ".write-test-4242").write_text("")  # rank 0's probe, caught between its creation and removal
    answers = []
    monkeypatch.setattr(dist_utils, "broadcast_object", lambda obj, info, src=0: answers.append(obj) or None)
    assert _run_folder(Config(out=str(out)), dist_utils.DistInfo(rank=1, world_size=2)) == out
    assert answers == [None]  # rank 1 judged nothing itself
