"""PCA from accumulated sums, and the projection that turns raw prior features into standardised targets."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rela.errors import RelaError


@dataclass
class PcaProjection:
    mean: torch.Tensor        # (D,) float64
    components: torch.Tensor  # (D, k) float64, columns by decreasing variance, sign-normalised
    scale: torch.Tensor       # (k,) float64: 1 / std of each projected dimension

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) raw features of any float dtype -> (n, k) float32 targets, zero mean and unit std."""
        centred = rows.to(torch.float64) - self.mean
        return ((centred @ self.components) * self.scale).to(torch.float32)


def pca_from_sums(row_sum: torch.Tensor, outer_sum: torch.Tensor, count: int, k: int,
                  rel_eps: float = 1e-9, *, what: str = "the features", noise_eps: float = 1e-12) -> PcaProjection:
    """Principal axes of the rows whose sum and sum of outer products (float64) are given.

    Keeps at most k axes, dropping those whose variance is below rel_eps of the largest (a rank-deficient
    prior, or fewer rows than dimensions), so standardising never divides by ~0. Each axis's sign is
    fixed so that its largest-magnitude loading is positive: the bank is then reproducible.

    RelaError, naming `what` (e.g. "prior rand's features"), when the sums are not finite (a prior that
    outputs NaN, or inf after overflowing float16) or when no axis varies beyond noise_eps of the rows'
    mean square: identical rows (a collapsed prior) leave a covariance of float64 rounding errors, about
    4e-15 of the mean square for 20k rows and 3e-14 for 1.28M (measured), which must not become targets.
    """
    row_sum, outer_sum = row_sum.to(torch.float64), outer_sum.to(torch.float64)
    if not (torch.isfinite(row_sum).all() and torch.isfinite(outer_sum).all()):
        bad = int((~torch.isfinite(row_sum) | ~torch.isfinite(outer_sum.diagonal())).sum())
        raise RelaError(f"{what} are not finite: NaN or inf in {bad} of {len(row_sum)} dimensions over {count} "
                        "images (a prior that outputs NaN, or overflows in float16?), so their PCA cannot be taken")
    mean = row_sum / count
    covariance = outer_sum / count - torch.outer(mean, mean)
    covariance = 0.5 * (covariance + covariance.T)
    variances, axes = torch.linalg.eigh(covariance)  # ascending
    variances, axes = variances.flip(0), axes.flip(1)
    noise = noise_eps * float(outer_sum.diagonal().sum()) / count
    if not variances[0] > noise:
        raise RelaError(f"{what} do not vary: all {count} images give the same features (largest variance "
                        f"{float(variances[0]):.3g}), so they hold no targets; the prior has collapsed")
    keep = min(k, int((variances > max(rel_eps * float(variances[0]), noise)).sum()))
    variances, axes = variances[:keep], axes[:, :keep]
    pivot = axes.abs().argmax(0)
    signs = torch.sign(axes[pivot, torch.arange(keep)])
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PcaProjection(mean, axes, variances.rsqrt())
