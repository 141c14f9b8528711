"""The GPU's fast paths inside the training loop, run on the CPU: bf16 autocast, channels_last and the
fused Triton ops (in Triton's interpreter, which tests/conftest.py turns on where there is no GPU)."""
from __future__ import annotations

import json
import math

from builders import FAST_ARGS, training_rows
from rela.train import main


def test_bf16_channels_last_and_fused_ops_train_through_the_hand_over(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--device", "cpu", "--precision", "bf16", "--channels-last", "--fused-ops", "on",
                 "--prior", "rand", "--budget", "0.1", "--rela-phase", "0.5", "--log-every", "1",
                 "--out", str(out), "--bank-dir", str(tmp_path / "banks")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = training_rows(out)
    assert {r["step_fn"] for r in rows} == {"rela_step", "blend_byol_step", "byol_step"}  # the default linear hand-over
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the fused losses' values: 1 - cos is in [0, 2] per view; BYOL's symmetric loss is twice that, and a blend
    # of the two lies between
    assert all(0 <= r["loss"] <= 2 for r in rows if r["step_fn"] == "rela_step")
    assert all(0 <= r["loss"] <= 4 for r in rows if r["step_fn"] in ("blend_byol_step", "byol_step"))
    assert summary["linear_probe_top1"] > 20  # chance is 10%


def test_compiled_backbones_train_and_save_under_their_own_names(tmp_path, monkeypatch):
    """--compile on the CPU (fused ops off; aot_eager traces through dynamo and AOTAutograd without a C++
    build): the run trains through the hand-over, and its checkpoint and backbone.pt keep plain names."""
    import torch

    from rela.utils.checkpoint_files import latest_checkpoint

    compiled = []
    real_compile = torch.nn.Module.compile

    def spy(module, *args, **kwargs):
        compiled.append((type(module).__name__, kwargs.get("backend")))
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--compile", "on", "--compile-backend", "aot_eager", "--fused-ops", "off",
                 "--prior", "rand", "--budget", "0.1", "--rela-phase", "0.5", "--log-every", "1",
                 "--out", str(out), "--bank-dir", str(tmp_path / "banks")]) == 0
    rows = training_rows(out)
    assert {r["step_fn"] for r in rows} == {"rela_step", "blend_byol_step", "byol_step"}
    assert all(math.isfinite(r["loss"]) for r in rows)
    learner = torch.load(latest_checkpoint(out), weights_only=False)["learner"]
    backbone = torch.load(out / "backbone.pt", weights_only=False)["state_dict"]
    assert len(compiled) == 2 and {backend for _, backend in compiled} == {"aot_eager"}  # online and target
    assert not any("_orig_mod" in k for k in [*learner, *backbone])
    assert any(k.startswith("method.backbone.") for k in learner)
