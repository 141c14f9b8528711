"""Each method, alone (no RELA phase), learns on real digits: its backbone's kNN ends at least 2 points above
the same backbone at its initialisation, evaluated the same way, and its loss falls by at least 1% (DINO's
with the settings its notes below explain). Measured (seed 0, kNN against the untrained 72.6%): SimCLR 85.3, MoCo v3 79.6,
Barlow Twins 78.1, VICReg 86.7, SimSiam 80.3, DINO 78.8 (loss 7.66 -> 7.37).

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
from rela.config import METHOD_NAMES
from rela.options import parse_config
from rela.train import evaluate_untrained, main

ARGS = ["--dataset", "mnist5k", "--device", "cpu", "--prior", "none", "--epochs", "6", "--seed", "0",
        "--no-monitor", "--no-progress", "--no-curves"]
KNN_MARGIN = 2.0


@pytest.fixture(scope="module")
def untrained() -> dict:
    return evaluate_untrained(parse_config(ARGS))


# DINO's settings on this preset are the reference code's (rela/methods/dino.py SMALL_PRESET_DINO), because
# the paper's do not learn here. With them (3-layer head without BN, K = 1,024, teacher 0.04 -> 0.07, cosine
# momentum, crops 0.14-1) DINO's loss rises above log K while the centre catches up (about 20 steps), then sits
# at log K = 6.93, the value of a uniform teacher (seed 0: 6.94 -> 6.93); teacher and student outputs end
# within 0.01 nats of uniform (kNN still +6.9 over the untrained backbone). Each of these alone left it there
# (150-500 steps, seed 0): teacher 0.04 fixed, 0.02 or 0.01; BN in the head; the prototypes frozen for the first
# epoch; teacher momentum 0.9995; an 8x lower learning rate; batch 128; K = 64. Teacher 0.01 with centre momentum
# 0.99 collapsed to one prototype instead. The plateau ends by itself at about step 1,400 of 2,500. Under
# --recipe reference DINO left it within 150 steps, and taking its settings back one at a time showed four
# that matter together: BN in the head, teacher 0.04 throughout, fixed teacher momentum, and crops 0.4-1 (each
# one undone: loss -0.7% or less); the 2-layer head, K = 2,048, the constant learning rate and weight decay
# 0.01 did not matter (loss -4% to -10% without each).


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Each method trained once (150 steps, seed 0) per set of extra flags, for the tests below: (summary,
    training losses)."""
    runs: dict[tuple[str, ...], tuple[dict, list[float]]] = {}

    def run(method: str, *flags: str) -> tuple[dict, list[float]]:
        if (method, *flags) not in runs:
            out = tmp_path_factory.mktemp(method)
            assert main([*ARGS, "--method", method, *flags, "--out", str(out)]) == 0
            runs[(method, *flags)] = (json.loads((out / "summary.json").read_text()),
                                      [r["loss"] for r in training_rows(out)])
        return runs[(method, *flags)]
    return run


def loss_fell(losses: list[float]) -> bool:
    """The last three logged losses' mean at least 1% below the first three's."""
    first, last = statistics.fmean(losses[:3]), statistics.fmean(losses[-3:])
    return last < first - 0.01 * abs(first)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "byol"])
def test_each_method_learns_beyond_the_untrained_backbone(method, untrained, trained_run, capsys):
    trained, losses = trained_run(method)
    with capsys.disabled():  # the numbers belong in the CI log
        print(f"\n{method} mnist5k seed 0, 150 steps: linear {trained['linear_probe_top1']:.2f} kNN "
              f"{trained['knn_top1']:.2f} (untrained {untrained['linear_probe_top1']:.2f} / {untrained['knn_top1']:.2f}); "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert trained["knn_top1"] >= untrained["knn_top1"] + KNN_MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "byol"])
def test_each_method_loss_falls(method, trained_run):
    _, losses = trained_run(method)
    assert loss_fell(losses)  # seed 0: 3.4% VICReg to 35% Barlow Twins


@pytest.mark.slow
def test_dino_learns_under_the_reference_codes_settings(untrained, trained_run, capsys):
    """DINO with --recipe reference (LINs-lab/ReLA's head, loss settings and optimiser) leaves log K within 150
    steps: its loss falls (seed 0: 7.49 -> 6.93, log 2,048 = 7.62) and its kNN beats the untrained backbone."""
    trained, losses = trained_run("dino", "--recipe", "reference")
    with capsys.disabled():
        print(f"\ndino --recipe reference mnist5k seed 0, 150 steps: kNN {trained['knn_top1']:.2f} "
              f"(untrained {untrained['knn_top1']:.2f}); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert loss_fell(losses)
    assert trained["knn_top1"] >= untrained["knn_top1"] + KNN_MARGIN
