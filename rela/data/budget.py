"""BudgetSampler: each epoch, a fresh seeded random fraction of the training set, split across ranks.

Every rank draws the same subset (same seed, same epoch) and takes a disjoint share of it, so no image
is seen twice in an epoch and all ranks run the same number of steps. The subset is exactly what is
trained on: its size is rounded down to whole batches on every rank, so every batch holds exactly
`batch_size` images. A short last batch would be a new input shape once an epoch (torch.compile
recompiles the backbone for it) and a step at another batch size than the recipe's (its learning rate and
BatchNorm statistics); the reference code drops it too (DataLoader(drop_last=True)).
"""
from __future__ import annotations

import numpy as np

from rela.errors import RelaError


class BudgetSampler:
    def __init__(self, num_items: int, budget: float, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not 0.0 < budget <= 1.0:
            raise RelaError(f"--budget must be in (0, 1], got {budget}")
        if batch_size < 2:
            raise RelaError(f"--batch-size must be at least 2 per rank, got {batch_size}")
        self.num_items, self.budget, self.batch_size = num_items, budget, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_rank = int(num_items * budget) // world_size
        if per_rank < 2:
            raise RelaError(f"--budget {budget} of {num_items} images leaves {per_rank} per rank "
                            f"over {world_size} rank(s): too few to train on")
        # Every step would be one short batch: the recipe's batch size (and the learning rate and BatchNorm
        # statistics that go with it) would silently not be the one asked for.
        if per_rank < batch_size:
            raise RelaError(f"an epoch holds {per_rank} images per rank (--budget {budget} of {num_items} training "
                            f"images over {world_size} rank(s)), fewer than one batch ({batch_size} per rank): lower "
                            "--batch-size or raise --budget")
        self.per_rank = per_rank - per_rank % batch_size  # whole batches: the short last one is dropped
        self.epoch = 0

    @property
    def subset_size(self) -> int:
        return self.per_rank * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_subset(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's subset, in the order it is visited (all ranks together)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_items)[: self.subset_size]

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's share of the epoch's subset: every world_size-th index from `rank`."""
        return self.epoch_subset(epoch)[self.rank:: self.world_size]

    def batches(self, epoch: int | None = None, start_step: int = 0) -> list[np.ndarray]:
        """This rank's batches for the epoch, from `start_step` on (to resume mid-epoch); each holds
        exactly `batch_size` indices."""
        indices = self.rank_indices(epoch)
        return [indices[s: s + self.batch_size]
                for s in range(start_step * self.batch_size, len(indices), self.batch_size)]
