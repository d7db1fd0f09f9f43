"""GRPO's data-parallel row layout (dsv3.rl.ranks): contiguous shards of the step's completions, a group
may straddle ranks, so advantages need every rank's rewards (the gathered shards give the single-process
advantages; shard-local statistics do not)."""

from __future__ import annotations

import pytest
import torch

from dsv3.rl.loss import group_advantages
from dsv3.rl.ranks import Ranks, shard_rows


def test_shards_are_contiguous_and_cover_the_step():
    assert [shard_rows(12, r, 2) for r in range(2)] == [slice(0, 6), slice(6, 12)]
    assert [shard_rows(12, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert shard_rows(5, 0, 1) == slice(0, 5)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_rows(6, 0, 4)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        shard_rows(4, 2, 2)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_from_gathered_shards_equal_single_process(scale):
    g = torch.Generator().manual_seed(0)
    G, world = 4, 2
    rewards = torch.rand(3 * G, generator=g, dtype=torch.float64)  # 3 groups: the 2nd straddles the ranks
    rewards[5] = float("nan")  # an unscored completion
    full, zero = group_advantages(rewards, G, scale)
    shards = [rewards[shard_rows(len(rewards), r, world)] for r in range(world)]
    gathered = torch.cat(shards)  # what Ranks.gather_rows returns on every rank
    for r in range(world):
        rows = shard_rows(len(rewards), r, world)
        adv, z = group_advantages(gathered, G, scale)
        assert torch.equal(adv[rows], full[rows]) and torch.equal(z[rows], zero[rows])
    # the statistics of a shard alone are wrong: 6 rows are not whole groups of 4
    with pytest.raises(ValueError):
        group_advantages(shards[0], G, scale)
    local = group_advantages(shards[0][:4], G, scale)[0]  # the first, whole group on one rank
    if scale == "batch":  # the batch std is the whole step's, not a shard's
        assert not torch.allclose(local, full[:4])
    else:
        assert torch.equal(local, full[:4])
    straddling = group_advantages(torch.cat([shards[0][4:], shards[0][4:]]), G, scale)[0][:2]
    assert not torch.allclose(straddling, full[4:6])  # half a group's statistics are not the group's


def test_single_process_ranks_are_identity():
    ranks = Ranks()
    assert (ranks.world, ranks.rank, ranks.is_main) == (1, 0, True)
    x = torch.arange(6.0)
    assert ranks.gather_rows(x) is x
    assert ranks.sum([1.5, 2]) == [1.5, 2.0] and ranks.max([3]) == [3.0]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ranks.reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    ranks.barrier()
