"""--logger tensorboard: the rows of metrics.jsonl read back as scalars through TensorBoard's own reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rela.errors import RelaError
from rela.options import parse_config
from rela.utils.progress import RunLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_every_metrics_row(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((finished_run / "summary.json").read_text())
    scalars = _scalars(finished_run / "tensorboard")
    train = [r for r in rows if "loss" in r]
    assert {r["phase"] for r in train} == {"rela", "byol"}
    fields = {"rho": "rela/rho", "rela_threshold": "rela/threshold", "lr": "schedule/lr", "momentum": "schedule/momentum",
              "images_per_s": "speed/images_per_s", "data_wait_fraction": "speed/data_wait_fraction",
              "probe_loss": "online_probe/loss"}
    for r in train:
        assert scalars[f"loss/{r['phase']}"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # float32 in events
        for field, tag in fields.items():
            assert scalars[tag][r["step"]] == pytest.approx(r[field], rel=1e-6, abs=1e-12), (field, r["step"])
    # each phase's loss only at its own steps
    assert max(scalars["loss/rela"]) <= summary["rela_phase_end_step"] < min(scalars["loss/byol"])
    assert scalars["rela/switch_step"] == {summary["rela_phase_end_step"]: summary["rela_phase_end_step"]}
    assert list(scalars["rela/threshold"].values()) == pytest.approx([0.995] * len(train))
    # the kNN monitor against the step and against wall-clock (its step: whole seconds of the run)
    monitor = [r for r in rows if "monitor_knn_top1" in r]
    assert len(monitor) >= 3
    assert scalars["monitor/knn_top1"] == {r["step"]: pytest.approx(r["monitor_knn_top1"]) for r in monitor}
    by_clock = scalars["monitor/knn_top1_vs_wall_clock_s"]
    assert by_clock == {round(r["wall_clock_s"]): pytest.approx(r["monitor_knn_top1"]) for r in monitor}


def test_only_rank_zero_and_only_when_asked_write_events(tmp_path):
    for name, enabled, loggers in (("jsonl", True, "jsonl"), ("other-rank", False, "jsonl,tensorboard")):
        log = RunLog(tmp_path / name, enabled=enabled, loggers=loggers)
        (tmp_path / name).mkdir()
        log.metrics({"step": 1, "phase": "byol", "loss": 1.0})
        log.close()
        assert not (tmp_path / name / "tensorboard").exists()
    log = RunLog(tmp_path / "main", enabled=True, loggers="jsonl,tensorboard")
    (tmp_path / "main").mkdir()
    log.metrics({"step": 3, "phase": "byol", "loss": 0.5})
    log.close()
    assert _scalars(tmp_path / "main" / "tensorboard") == {"loss/byol": {3: 0.5}}


def test_resumed_log_hides_events_after_the_checkpoint(tmp_path):
    """As metrics.jsonl drops rows past the checkpoint a run resumes from, TensorBoard purges those steps."""
    log = RunLog(tmp_path, enabled=True, loggers="tensorboard")
    for step in (2, 4, 6):
        log.metrics({"step": step, "phase": "byol", "loss": float(step)})
    log.close()
    resumed = RunLog(tmp_path, enabled=True, loggers="tensorboard")
    resumed.trim_metrics(after_step=4)
    resumed.metrics({"step": 6, "phase": "byol", "loss": 60.0})
    resumed.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/byol")] == [(2, 2.0), (4, 4.0), (6, 60.0)]


def test_logger_choices_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(RelaError, match="--logger takes a comma list"):
        parse_config(["--logger", "wandb"])
    assert parse_config(["--logger", "jsonl,tensorboard"]).logger == "jsonl,tensorboard"
    import rela.utils.tensorboard as tb

    monkeypatch.setattr(tb, "SummaryWriter", None)  # as where the tensorboard package is not installed
    with pytest.raises(RelaError, match=r"needs the tensorboard package: pip install") as err:
        RunLog(tmp_path, enabled=False, loggers="tensorboard")  # every rank checks, so all stop alike
    assert "\n" not in str(err.value)
