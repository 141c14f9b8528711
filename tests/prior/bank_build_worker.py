"""Fixtures for the bank-build tests, and one rank of a two-rank build when run under torchrun.

Under torchrun (gloo, CPU) each rank builds the whole target bank with `prepare_target_bank` (its shard
of the raw pass, its share of the PCA projection, gathered) and projects a fixed set of rows with
`project_rows`; it saves both to OUT/rank{r}.pt for the test to compare with one process's.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rela.prior.pca import pca_from_sums
from rela.prior.specs import Prior
from rela.prior.target_bank import prepare_target_bank, project_rows
from rela.utils.distributed import init_distributed, shutdown

_spec = importlib.util.spec_from_file_location("raw_features_worker", Path(__file__).with_name("raw_features_worker.py"))
raw_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raw_worker)
load_batch = raw_worker.load_batch

NUM_ROWS, FEATURE_DIM, TARGET_DIM, BATCH = 37, 12, 5, 4


class ExactPrior(nn.Module):
    """raw_features_worker's exact prior as a module (the bank moves its encoder to the device)."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.register_buffer("weight", raw_worker.prior_weight(feature_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1) @ self.weight.T) / 1000.0 + 50.0


def make_prior() -> Prior:
    return Prior("test", ExactPrior().eval(), 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "test:exact")


def build_bank(bank_dir: Path, dist, load=load_batch, batch_size: int = BATCH):
    return prepare_target_bank(make_prior(), load, num_rows=NUM_ROWS, dataset_fingerprint="rows-37",
                               dataset_name="rows", crop_fraction=1.0, target_dim=TARGET_DIM, bank_dir=bank_dir,
                               batch_size=batch_size, dist=dist, device=torch.device("cpu"),
                               log=logging.getLogger("bank-test"), show_progress=False)


def projection_fixture(num_rows: int = 1001, dim: int = 24, k: int = 7):
    """(features as a float32 array, the PCA projection of them)."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64) @ torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    features = rows.to(torch.float32).numpy()
    x = torch.from_numpy(features).to(torch.float64)
    return features, pca_from_sums(x.sum(0), x.T @ x, num_rows, k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist = init_distributed("cpu")
    features, projection = projection_fixture()
    projected = project_rows(np.asarray(features), projection, torch.device("cpu"), rank=dist.rank,
                             world_size=dist.world_size, chunk=100)
    bank = build_bank(args.out / "banks", dist)
    torch.save({"projected": projected, "targets": bank.targets, "key": bank.key}, args.out / f"rank{dist.rank}.pt")
    shutdown()


if __name__ == "__main__":
    main()
