"""The options a user sets reach each method's loss: a spy on the loss function records what it was called
with, for values that differ from every preset's default (a method that ignored --temperature and used 1.0,
say, still learns, so only this kind of check notices)."""
from __future__ import annotations

import pytest
import torch

import rela.methods.barlowtwins
import rela.methods.dino
import rela.methods.mocov3
import rela.methods.simclr
import rela.methods.vicreg
from rela.methods.registry import build_method
from rela.models.backbones import build_backbone
from rela.options import parse_config

SMALL = ["--proj-hidden", "32", "--proj-dim", "16", "--dino-out-dim", "64"]

# method: (its module, the loss function's name, flags, what the loss must receive: positional index or
# keyword name -> value)
CASES = {
    "simclr": (rela.methods.simclr, "nt_xent_loss", ["--temperature", "0.37"], {2: 0.37}),
    "mocov3": (rela.methods.mocov3, "moco_contrastive_loss", ["--temperature", "0.41"], {2: 0.41}),
    "barlowtwins": (rela.methods.barlowtwins, "barlow_twins_loss", ["--barlow-lambda", "0.031"], {2: 0.031}),
    "vicreg": (rela.methods.vicreg, "vicreg_loss",
               ["--vicreg-sim-weight", "3.5", "--vicreg-var-weight", "7.5", "--vicreg-cov-weight", "0.25"],
               {2: 3.5, 3: 7.5, 4: 0.25}),
    "dino": (rela.methods.dino, "dino_loss",
             ["--dino-student-temp", "0.23", "--dino-teacher-temp", "0.061", "--dino-warmup-teacher-epochs", "0"],
             {5: 0.23, 6: 0.061}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_the_configured_settings_reach_the_loss(method, monkeypatch):
    module, name, flags, expected = CASES[method]
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    torch.manual_seed(0)
    cfg = parse_config(["--dataset", "digits", "--method", method, *SMALL, *flags])
    learner = build_method(cfg, build_backbone("small_resnet", seed=0))
    learner.train()
    g = torch.Generator().manual_seed(1)
    learner(torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g), fused=False)
    assert calls, f"{name} was not called"
    for args, kwargs in calls:
        for where, value in expected.items():
            got = args[where] if isinstance(where, int) else kwargs[where]
            assert got == pytest.approx(value), (where, got, value)
