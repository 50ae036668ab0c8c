import numpy as np
import pytest

from common.data import datasets

# Global batches are at least the world size (common.parallel.plan.check_batch rejects less).
SHARDING_CASES = [(world_size, num_samples, global_batch)
                  for world_size in (1, 2, 3, 4, 5)
                  for num_samples, global_batch in [(1437, 64), (100, 7), (17, 5), (10, 10), (9, 4)]
                  if global_batch >= world_size]


@pytest.mark.parametrize("world_size,num_samples,global_batch", SHARDING_CASES)
def test_each_sample_exactly_once_and_equal_step_counts(world_size, num_samples, global_batch):
    per_rank = [datasets.rank_batches(num_samples, global_batch, world_size, rank, seed=3, epoch=1)
                for rank in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1
    used = np.concatenate([indices for batches in per_rank for indices, _ in batches])
    assert sorted(used.tolist()) == list(range(num_samples))
    for step in range(len(per_rank[0])):
        counts = {count for batches in per_rank for _, count in [batches[step]]}
        shares = [len(batches[step][0]) for batches in per_rank]
        assert counts == {sum(shares)}
        assert max(shares) - min(shares) <= 1


def test_order_changes_per_epoch_and_is_seeded():
    first = datasets.epoch_permutation(50, seed=0, epoch=0)
    assert np.array_equal(first, datasets.epoch_permutation(50, seed=0, epoch=0))
    assert not np.array_equal(first, datasets.epoch_permutation(50, seed=0, epoch=1))
    assert not np.array_equal(first, datasets.epoch_permutation(50, seed=1, epoch=0))


def test_global_batches_do_not_depend_on_world_size():
    """Rank shares of a step, put together, are the single-process batch of that step."""
    single = datasets.rank_batches(103, 16, 1, 0, seed=5, epoch=2)
    for world_size in (2, 3, 4):
        shares = [datasets.rank_batches(103, 16, world_size, rank, seed=5, epoch=2) for rank in range(world_size)]
        for step, (indices, count) in enumerate(single):
            joined = np.concatenate([shares[rank][step][0] for rank in range(world_size)])
            assert np.array_equal(joined, indices) and count == len(indices)


def test_step_limit():
    assert datasets.steps_per_epoch(100, 10) == 10
    assert datasets.steps_per_epoch(101, 10) == 11
    assert datasets.steps_per_epoch(101, 10, step_limit=3) == 3
    assert len(datasets.rank_batches(101, 10, 2, 0, 0, 0, step_limit=3)) == 3


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("num_samples", [1, 4, 360, 361])
def test_eval_shards_cover_the_set_once(world_size, num_samples):
    shards = [datasets.eval_shard(num_samples, world_size, rank) for rank in range(world_size)]
    assert np.concatenate(shards).tolist() == list(range(num_samples))
