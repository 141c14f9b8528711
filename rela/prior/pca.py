"""PCA from accumulated sums, and the projection that turns raw prior features into standardised targets."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
                  rel_eps: float = 1e-9) -> PcaProjection:
    """Principal axes of the rows whose sum and sum of outer products (float64) are given.

    Keeps at most k axes, dropping those whose variance is below rel_eps of the largest (a rank-deficient
    prior, or fewer rows than dimensions), so standardising never divides by ~0. Each axis's sign is
    fixed so that its largest-magnitude loading is positive: the bank is then reproducible.
    """
    row_sum, outer_sum = row_sum.to(torch.float64), outer_sum.to(torch.float64)
    mean = row_sum / count
    covariance = outer_sum / count - torch.outer(mean, mean)
    covariance = 0.5 * (covariance + covariance.T)
    variances, axes = torch.linalg.eigh(covariance)  # ascending
    variances, axes = variances.flip(0), axes.flip(1)
    keep = min(k, int((variances > rel_eps * variances[0].clamp(min=1e-300)).sum()))
    variances, axes = variances[:keep], axes[:, :keep]
    pivot = axes.abs().argmax(0)
    signs = torch.sign(axes[pivot, torch.arange(keep)])
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PcaProjection(mean, axes, variances.rsqrt())
