"""Priors that load but cannot give targets: refused in one line naming the prior, with no target bank written;
and the PCA's own checks (non-finite sums, identical rows)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision

from badfiles import run_trainer
from builders import FAST_ARGS
from rela.errors import RelaError
from rela.models.backbones import build_backbone
from rela.prior.pca import pca_from_sums

PRIOR_ARGS = [*FAST_ARGS, "--prior-size", "16", "--stop-after-steps", "2"]


class ConstantFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 8), 0.3) + 0 * x.mean()


class NaNForOneImage(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.mean((2, 3)).repeat(1, 4)
        return torch.where(torch.arange(x.shape[0])[:, None] == 1, float("nan"), features)


class OverflowsInHalf(torch.nn.Module):
    """Features of ~1e5 cast to float16 (largest finite 65504): inf, as a prior run in fp16 can overflow."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean((2, 3)).repeat(1, 4) * 1e5).half().float()


class MadeFor8Pixels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def _scripted(tmp_path, module: torch.nn.Module) -> str:
    path = tmp_path / f"{type(module).__name__}.pt"
    torch.jit.script(module).save(str(path))
    return f"torchscript:{path}"


@pytest.mark.parametrize("module, expected", [
    # The largest variance is 0 or rounding noise (the covariance is summed in pieces): either way no targets.
    (ConstantFeatures(), re.compile(r"'s features do not vary: all 1438 images give the same features \(largest "
                                    r"variance [0-9.e+-]+\), so they hold no targets; the prior has collapsed")),
    (NaNForOneImage(), "'s features are not finite: NaN or inf in 12 of 12 dimensions over 1438 images"),
    (OverflowsInHalf(), "'s features are not finite: NaN or inf in 12 of 12 dimensions over 1438 images"),
], ids=["collapsed", "nan", "fp16_overflow"])
def test_prior_without_usable_features_is_named(tmp_path, capsys, module, expected):
    """Before: a collapsed prior failed at the first step (rela_map None: a TypeError), and NaN or inf features
    ended in a LinAlgError about ill-conditioning."""
    spec = _scripted(tmp_path, module)
    line = run_trainer(capsys, tmp_path, *PRIOR_ARGS, "--prior", spec).error_line
    prefix = f"rela.train: error: prior {spec}"
    assert line.startswith(prefix), line
    rest = line[len(prefix):]
    assert (expected.match(rest) if isinstance(expected, re.Pattern) else rest.startswith(expected)), line
    assert not list((tmp_path / "banks").glob("bank-*.pt")), "no target bank is written"
    assert not list((tmp_path / "run").glob("*.pt")), "no checkpoint is written"


def test_prior_made_for_other_inputs_is_named(tmp_path, capsys):
    """Before: TorchScript's traceback of a shape error inside the prior."""
    spec = _scripted(tmp_path, MadeFor8Pixels())
    line = run_trainer(capsys, tmp_path, *PRIOR_ARGS, "--prior", spec).error_line
    assert line.startswith(f"rela.train: error: --prior {spec} does not fit its input (3, 16, 16): "), line
    assert "mat1 and mat2 shapes cannot be multiplied" in line


def test_run_prior_of_another_architecture_is_named(tmp_path, capsys):
    """A backbone.pt that names small_resnet but holds resnet18_cifar's weights. Before: load_state_dict's
    message, every missing and unexpected key over three lines."""
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    torch.save({"arch": "small_resnet", "state_dict": build_backbone("resnet18_cifar").state_dict(), "image_size": 16,
                "mean": [0.2] * 3, "std": [0.33] * 3}, run_dir / "backbone.pt")
    line = run_trainer(capsys, tmp_path, *PRIOR_ARGS, "--prior", f"run:{run_dir}").error_line
    assert (f"--prior run:{run_dir}: the weights in {run_dir / 'backbone.pt'} do not fit its architecture "
            "small_resnet: ") in line
    assert "missing keys (first: stem.0.weight)" in line and "unexpected keys (first: conv1.weight)" in line


def test_torchvision_weights_of_another_architecture_are_named(tmp_path, capsys):
    """resnet18's weights for torchvision:resnet34: named (one line before this work too; now it says which keys)."""
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    line = run_trainer(capsys, tmp_path, *PRIOR_ARGS, "--prior", f"torchvision:resnet34:{weights}").error_line
    assert f"{weights} does not fit resnet34: " in line and "missing keys (first: layer1.2.conv1.weight)" in line


# ---- The PCA --------------------------------------------------------------------------------------------

def _sums(rows: torch.Tensor, chunk: int = 256):
    """Sums as the raw pass accumulates them: float64, batch by batch."""
    x = rows.to(torch.float64)
    row_sum, outer_sum = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], x.shape[1],
                                                                                   dtype=torch.float64)
    for start in range(0, len(x), chunk):
        row_sum += x[start: start + chunk].sum(0)
        outer_sum.addmm_(x[start: start + chunk].T, x[start: start + chunk])
    return row_sum, outer_sum


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_pca_names_non_finite_features(bad):
    rows = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    rows[17, 2] = bad
    with pytest.raises(RelaError, match=r"^prior p's features are not finite: NaN or inf in 1 of 6 dimensions"):
        pca_from_sums(*_sums(rows), 100, 4, what="prior p's features")


@pytest.mark.parametrize("d, n, scale", [(8, 1000, 0.3), (64, 5000, 3.0), (128, 2000, 1e4)])
def test_pca_refuses_identical_rows_whatever_their_values(d, n, scale):
    """Identical rows leave a covariance of float64 rounding errors (~4e-15 of the mean square, not 0): before,
    those errors became standardised noise targets, or a width of 0 where they cancelled exactly."""
    value = torch.randn(d, generator=torch.Generator().manual_seed(d)) * scale
    rows = value.expand(n, d).to(torch.float32)
    with pytest.raises(RelaError, match="do not vary: all .* images give the same features"):
        pca_from_sums(*_sums(rows), n, 4)


def test_pca_keeps_a_small_variance_on_a_large_offset():
    """Features of spread 1e-3 around 10 vary beyond rounding: kept, one axis, standardised."""
    generator = torch.Generator().manual_seed(1)
    rows = 10 + 1e-3 * torch.randn(2000, 1, dtype=torch.float64, generator=generator) * torch.ones(1, 4,
                                                                                                  dtype=torch.float64)
    projection = pca_from_sums(*_sums(rows), 2000, 4)
    assert projection.components.shape == (4, 1)
    targets = projection.apply(rows)
    assert torch.isfinite(targets).all() and abs(float(targets.std()) - 1) < 1e-3
    np.testing.assert_allclose(float(targets.mean()), 0, atol=1e-4)
