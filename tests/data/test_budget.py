import numpy as np
import pytest

from rela.data.budget import BudgetSampler
from rela.errors import RelaError


@pytest.mark.parametrize("n,budget,batch,world", [(1000, 0.2, 32, 1), (1000, 0.1, 16, 2), (997, 0.5, 7, 3),
                                                  (50, 1.0, 8, 4)])
def test_ranks_are_disjoint_and_cover_the_subset(n, budget, batch, world):
    samplers = [BudgetSampler(n, budget, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in range(3):
        shares = [s.rank_indices(epoch) for s in samplers]
        union = np.concatenate(shares)
        assert len(union) == len(set(union.tolist())), "an index appears on two ranks"
        assert sorted(union.tolist()) == sorted(samplers[0].epoch_subset(epoch).tolist())
        assert len(union) == samplers[0].subset_size
        assert int(n * budget) - world * batch < samplers[0].subset_size <= int(n * budget)  # whole batches
        assert len({len(s) for s in shares}) == 1, "ranks must run the same number of steps"
        batches = samplers[0].batches(epoch)
        assert len(batches) == samplers[0].steps_per_epoch
        assert np.array_equal(np.concatenate(batches), shares[0])
        assert all(len(b) == batch for b in batches)


def test_new_subset_each_epoch_and_reproducible():
    a = BudgetSampler(1000, 0.2, 32, seed=5)
    b = BudgetSampler(1000, 0.2, 32, seed=5)
    c = BudgetSampler(1000, 0.2, 32, seed=6)
    assert not np.array_equal(np.sort(a.epoch_subset(0)), np.sort(a.epoch_subset(1)))
    assert np.array_equal(a.epoch_subset(4), b.epoch_subset(4))
    assert not np.array_equal(a.epoch_subset(0), c.epoch_subset(0))


def test_resume_mid_epoch_skips_done_batches():
    s = BudgetSampler(500, 0.5, 10, seed=1)
    assert [b.tolist() for b in s.batches(2, start_step=3)] == [b.tolist() for b in s.batches(2)[3:]]


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_budget_outside_unit_interval_is_rejected(budget):
    with pytest.raises(RelaError, match="budget"):
        BudgetSampler(100, budget, 8, seed=0)


@pytest.mark.parametrize("n,budget,batch,world", [(1000, 0.2, 32, 1), (997, 0.5, 7, 3), (143, 1.0, 16, 1),
                                                  (1438, 0.1, 16, 2), (50, 1.0, 8, 4), (17, 1.0, 16, 1)])
def test_every_batch_of_every_epoch_has_the_batch_size(n, budget, batch, world):
    """Sizes that do not divide: the short last batch is dropped on every rank (a new shape would make
    torch.compile recompile the backbone once an epoch), also when resuming mid-epoch."""
    assert (n * budget // world) % batch, "the case must leave a short last batch to drop"
    for rank in range(world):
        sampler = BudgetSampler(n, budget, batch, seed=4, rank=rank, world_size=world)
        assert sampler.steps_per_epoch == int(n * budget) // world // batch >= 1
        for epoch in range(3):
            batches = sampler.batches(epoch)
            assert [len(b) for b in batches] == [batch] * sampler.steps_per_epoch
            for start in range(sampler.steps_per_epoch):
                resumed = sampler.batches(epoch, start_step=start)
                assert [b.tolist() for b in resumed] == [b.tolist() for b in batches[start:]]
