"""Learning: on digits, RELA with a random prior at a 20% budget beats BYOL at a 20% budget.

Both runs use the digits preset as it ships (the default job), three seeds each, and compare the mean
linear-probe accuracy on the held-out split. Slow: six short training runs.
"""
from __future__ import annotations

import json
import statistics

import pytest

from rela.train import main


def linear_probe(tmp_path, name: str, seed: int, *prior: str) -> float:
    out = tmp_path / f"{name}-{seed}"
    args = ["--budget", "0.2", "--seed", str(seed), *prior, "--out", str(out), "--bank-dir",
            str(tmp_path / "banks"), "--no-progress"]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())["linear_probe_top1"]


@pytest.mark.slow
def test_rela_rand_prior_beats_byol_at_a_20_percent_budget(tmp_path, capsys):
    seeds = (0, 1, 2)
    rela = [linear_probe(tmp_path, "rela", s, "--prior", "rand") for s in seeds]
    byol = [linear_probe(tmp_path, "byol", s, "--prior", "none") for s in seeds]
    with capsys.disabled():  # the numbers belong in the CI log, not only in a failure report
        print(f"\nlinear probe top-1 at a 20% budget, seeds {seeds}:"
              f"\n  RELA (rand prior): {statistics.mean(rela):.2f}%  per seed {rela}"
              f"\n  BYOL             : {statistics.mean(byol):.2f}%  per seed {byol}")
    assert statistics.mean(rela) > statistics.mean(byol)
