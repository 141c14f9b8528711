"""Each method, alone (no RELA phase), learns on real digits: its loss falls by at least 1%, and its
backbone's kNN ends at least 2 points above the same backbone at its initialisation, evaluated the same
way. Measured (seed 0, kNN against the untrained 72.6%): SimCLR 85.3, MoCo v3 79.6, Barlow Twins 78.1,
VICReg 86.7, SimSiam 80.3, DINO 79.5 (but see DINO_AT_LOG_K).

mnist5k (5,000 real 28x28 MNIST digits), 150 steps at a 20% budget, seed 0, CPU. The untrained
small_resnet's kNN there is about 72.6%; on the 8x8 digits an untrained network is almost as good as a
trained one, so nothing could fail there. BYOL is left to tests/core/test_learning.py and
tests/methods/test_byol_step.py: 150 CPU steps barely move BYOL's features (see there).
"""
from __future__ import annotations

import json
import statistics

import pytest

from builders import training_rows
from rela.config import METHOD_NAMES, parse_config
from rela.train import evaluate_untrained, main

ARGS = ["--dataset", "mnist5k", "--device", "cpu", "--prior", "none", "--epochs", "6", "--seed", "0",
        "--no-monitor", "--no-progress", "--no-curves"]
KNN_MARGIN = 2.0


@pytest.fixture(scope="module")
def untrained() -> dict:
    return evaluate_untrained(parse_config(ARGS))


# DINO does not pass yet, and the test says so rather than being loosened: at 150 steps (batch 32, K = 1,024)
# its loss rises above log K in the first steps and then sits at log K = 6.93, the value of a uniform
# teacher (seed 0: 6.94 -> 6.93, a 0.2% fall), although its kNN is +6.9 points over the untrained backbone
# (linear -3.9). A fixed teacher temperature of 0.04 gave the same picture. Strict: once DINO learns here,
# the test fails until this mark goes.
DINO_AT_LOG_K = pytest.mark.xfail(strict=True, reason="DINO's loss sits at log K (a uniform teacher) in 150 CPU steps")


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param(m, marks=DINO_AT_LOG_K) if m == "dino" else m
                                    for m in METHOD_NAMES if m != "byol"])
def test_each_method_learns_beyond_the_untrained_backbone(method, untrained, tmp_path, capsys):
    out = tmp_path / method
    assert main([*ARGS, "--method", method, "--out", str(out)]) == 0
    trained = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in training_rows(out)]
    with capsys.disabled():  # the numbers belong in the CI log
        print(f"\n{method} mnist5k seed 0, 150 steps: linear {trained['linear_probe_top1']:.2f} kNN "
              f"{trained['knn_top1']:.2f} (untrained {untrained['linear_probe_top1']:.2f} / {untrained['knn_top1']:.2f}); "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    first, last = statistics.fmean(losses[:3]), statistics.fmean(losses[-3:])
    assert last < first - 0.01 * abs(first)  # a fall of at least 1% (seed 0: 3.4% VICReg to 35% Barlow Twins)
    assert trained["knn_top1"] >= untrained["knn_top1"] + KNN_MARGIN
