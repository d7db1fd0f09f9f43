"""Redundant-expert placement: invariants on random loads, balance on skewed loads, replica routing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.inference.eplb import Placement, choose_replicas, identity_placement, rebalance


@st.composite
def problems(draw):
    """(load [L, E], num_replicas, num_groups, num_nodes, num_gpus) covering both policies."""
    num_nodes = draw(st.sampled_from([1, 2, 4]))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    if draw(st.booleans()):
        num_groups = num_nodes * draw(st.integers(1, 3))  # hierarchical
    else:
        num_groups = draw(st.integers(1, 6))  # global unless it happens to divide
    E = num_groups * draw(st.integers(1, 4))
    R = num_gpus * (-(-E // num_gpus) + draw(st.integers(0, 3)))
    L = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["uniform", "skewed", "integer", "sparse"]))
    if kind == "uniform":
        load = torch.rand(L, E, generator=gen) * 100
    elif kind == "skewed":
        load = torch.rand(L, E, generator=gen) ** 8 * 1e4
    elif kind == "integer":
        load = torch.randint(0, 5, (L, E), generator=gen).float()
    else:
        load = torch.zeros(L, E)
        load[:, 0] = 50.0
    return load, R, num_groups, num_nodes, num_gpus


def _check_invariants(p: Placement, load, R, num_groups, num_nodes, num_gpus):
    L, E = load.shape
    p2l, l2p, cnt = p.physical_to_logical, p.logical_to_physical, p.replica_count
    assert p2l.shape == (L, R) and cnt.shape == (L, E) and l2p.shape[:2] == (L, E)
    assert p.experts_per_gpu * num_gpus == R
    for layer in range(L):
        assert torch.equal(torch.bincount(p2l[layer], minlength=E), cnt[layer])
        assert (cnt[layer] >= 1).all()  # every expert present
        for e in range(E):
            slots = l2p[layer, e]
            real = slots[slots >= 0]
            assert real.numel() == cnt[layer, e]
            assert (p2l[layer, real] == e).all()
            assert (slots[cnt[layer, e] :] == -1).all()
    # equal experts per GPU, and the load is conserved across GPUs
    gpu = p.gpu_load(load)
    assert gpu.shape == (L, num_gpus)
    torch.testing.assert_close(gpu.sum(-1), load.double().sum(-1))
    assert (gpu.amax(-1) >= load.double().sum(-1) / num_gpus - 1e-9).all()
    # replication is greedy on load per replica: no replica can move to a worse-off expert of its node
    hierarchical = num_groups % num_nodes == 0
    nodes = num_nodes if hierarchical else 1
    load64 = load.double()
    for layer in range(L):
        node_of_expert = p2l[layer].new_empty(E)
        node_of_expert[p2l[layer]] = torch.arange(R) // (R // nodes)
        for n in range(nodes):
            mine = node_of_expert == n
            per_replica = load64[layer, mine] / cnt[layer, mine]
            dropped = load64[layer, mine] / (cnt[layer, mine] - 1).clamp(min=1)
            multi = cnt[layer, mine] > 1
            assert (dropped[multi] >= per_replica.max() - 1e-9).all()
    if hierarchical:
        # hierarchical: all replicas of a group's experts on one node, equal number of groups per node
        group_size = E // num_groups
        node_of_slot = torch.arange(R) // (R // num_nodes)
        for layer in range(L):
            group_of_slot = p2l[layer] // group_size
            node_of_group = torch.full((num_groups,), -1)
            for g in range(num_groups):
                nodes = node_of_slot[group_of_slot == g].unique()
                assert nodes.numel() == 1, f"group {g} spans nodes {nodes.tolist()}"
                node_of_group[g] = nodes
            assert (torch.bincount(node_of_group, minlength=num_nodes) == num_groups // num_nodes).all()


@settings(max_examples=60, deadline=None)
@given(problems())
def test_invariants_on_random_loads(problem):
    load, R, num_groups, num_nodes, num_gpus = problem
    p = rebalance(load, R, num_groups, num_nodes, num_gpus)
    _check_invariants(p, load, R, num_groups, num_nodes, num_gpus)
    q = rebalance(load.clone(), R, num_groups, num_nodes, num_gpus)  # deterministic: ranks agree
    assert torch.equal(p.physical_to_logical, q.physical_to_logical)


def _zipf_load(L: int, E: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([zipf[torch.randperm(E, generator=gen)] for _ in range(L)]) * 1e4


@pytest.mark.parametrize(
    "R,num_groups,num_nodes,num_gpus",
    [(80, 8, 2, 8), (72, 8, 4, 8), (96, 16, 4, 16), (80, 2, 4, 8), (80, 8, 1, 16)],
    ids=["hier-2x4", "hier-4x2", "hier-4x4", "global", "one-node"],
)
def test_redundant_experts_lower_max_gpu_load_on_skewed_load(R, num_groups, num_nodes, num_gpus):
    load = _zipf_load(4, 64)
    ours = rebalance(load, R, num_groups, num_nodes, num_gpus).gpu_load(load).amax(-1)
    no_replicas = rebalance(load, 64, num_groups, num_nodes, num_gpus).gpu_load(load).amax(-1)
    static = identity_placement(4, 64, num_gpus).gpu_load(load).amax(-1)
    assert (ours < 0.8 * no_replicas).all(), (ours / no_replicas).tolist()
    assert (ours < 0.8 * static).all(), (ours / static).tolist()


def test_hot_expert_replicated_and_spread_over_gpus():
    load = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    p = rebalance(load, 12, 1, 1, 4)
    assert p.replica_count[0, 0] == 5
    gpus = p.logical_to_physical[0, 0, :5] // p.experts_per_gpu
    assert gpus.unique().numel() == 4  # 5 replicas on 4 GPUs: all GPUs carry the hot expert
    # the best any placement can do: one GPU holds two replicas (40) and a cold expert (1); mean 107 / 4
    assert p.imbalance(load)[0] == pytest.approx(41 / 26.75)
    assert identity_placement(1, 8, 4).imbalance(load)[0] == pytest.approx(101 / 26.75)


def test_hot_groups_go_to_different_nodes():
    load = torch.tensor([[9.0, 9, 9, 9, 1, 1, 1, 1]])  # groups {0,1} and {2,3} hot, 4 groups on 2 nodes
    p = rebalance(load, 8, 4, 2, 2)
    assert p.imbalance(load)[0] == 1.0
    assert identity_placement(1, 8, 2).imbalance(load)[0] == pytest.approx(36 / 20)


@pytest.mark.parametrize(
    "load,num_replicas,num_gpus,max_gpu_load",
    [([3.0, 6, 3], 4, 2, 6.0), ([9.0, 8, 0, 5, 7, 8], 8, 4, 11.0)],
)
def test_replicas_of_one_expert_avoid_sharing_a_gpu(load, num_replicas, num_gpus, max_gpu_load):
    # plain greedy packing would put two replicas of one expert on one GPU here, at no gain in balance
    load = torch.tensor([load])
    p = rebalance(load, num_replicas, 1, 1, num_gpus)
    per_gpu = p.physical_to_logical.view(num_gpus, -1)
    assert all(len(set(row.tolist())) == row.numel() for row in per_gpu), per_gpu.tolist()
    assert p.gpu_load(load).max() == max_gpu_load


def test_global_policy_when_groups_do_not_divide_over_nodes():
    load = _zipf_load(2, 12)
    p = rebalance(load, 16, 3, 2, 4)  # 3 groups over 2 nodes -> global
    _check_invariants(p, load, 16, 3, 2, 4)
    assert torch.equal(p.physical_to_logical, rebalance(load, 16, 1, 1, 4).physical_to_logical)


def test_zero_load_and_one_dim_load():
    p = rebalance(torch.zeros(8), 12, 2, 2, 4)
    assert p.num_layers == 1 and (p.replica_count >= 1).all()
    assert p.replica_count.max() == 2  # extra slots spread over zero-load experts, not piled on one
    assert p.imbalance(torch.zeros(1, 8))[0] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_replicas=6), "num_replicas=6 < num_experts=8"),
        (dict(num_replicas=10), "not divisible by num_gpus"),
        (dict(num_gpus=8), "num_replicas=12 is not divisible by num_gpus=8"),
        (dict(num_nodes=4, num_gpus=2, num_replicas=8), "num_gpus=2 is not divisible by num_nodes=4"),
        (dict(num_groups=3), "num_experts=8 is not divisible by num_groups=3"),
        (dict(num_groups=0), "num_groups must be a positive int"),
        (dict(load=torch.tensor([[1.0, -1, 1, 1, 1, 1, 1, 1]])), "non-negative"),
        (dict(load=torch.tensor([[float("nan")] * 8])), "finite"),
        (dict(load=torch.ones(2, 2, 8)), r"\[num_layers, num_experts\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(load=torch.ones(2, 8), num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4) | kwargs
    with pytest.raises(ValueError, match=match):
        rebalance(**args)


def test_placement_rejects_inconsistent_maps():
    p = rebalance(_zipf_load(1, 8), 12, 2, 2, 4)
    bad = p.logical_to_physical.clone()
    bad[0, 0, 0] = (bad[0, 0, 0] + 1) % 12
    with pytest.raises(ValueError, match="not inverse|padding"):
        Placement(p.physical_to_logical, bad, p.replica_count, 4)
    with pytest.raises(ValueError, match="replica_count"):
        Placement(p.physical_to_logical, p.logical_to_physical, p.replica_count + 1, 4)
    with pytest.raises(ValueError, match="split evenly"):
        Placement(p.physical_to_logical, p.logical_to_physical, p.replica_count, 5)


def test_choose_replicas_spreads_evenly_and_maps_to_the_expert():
    load = _zipf_load(1, 16)
    p = rebalance(load, 24, 4, 2, 8)
    l2p, cnt = p.logical_to_physical[0], p.replica_count[0]
    ids = torch.multinomial(load[0], 1000 * 2, replacement=True, generator=torch.Generator().manual_seed(1))
    ids = ids.view(1000, 2)
    phys = choose_replicas(ids, l2p, cnt)
    assert phys.shape == ids.shape
    assert torch.equal(p.physical_to_logical[0][phys], ids)  # every pair lands on a replica of its expert
    per_slot = torch.bincount(phys.reshape(-1), minlength=24)
    for e in range(16):
        got = per_slot[l2p[e, : cnt[e]]]
        assert got.sum() == (ids == e).sum()
        assert got.max() - got.min() <= 1, (e, got.tolist())
    # the offset rotates which replica takes the remainder
    hot = int(cnt.argmax())
    c = int(cnt[hot])
    pairs = torch.full((c + 1, 1), hot)
    expect0 = [int(l2p[hot, j % c]) for j in range(c + 1)]
    expect1 = [int(l2p[hot, (j + 1) % c]) for j in range(c + 1)]
    assert choose_replicas(pairs, l2p, cnt, offset=0).view(-1).tolist() == expect0
    assert choose_replicas(pairs, l2p, cnt, offset=1).view(-1).tolist() == expect1


def test_choose_replicas_bad_input():
    p = identity_placement(1, 4, 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        choose_replicas(torch.tensor([[4]]), p.logical_to_physical[0], p.replica_count[0])
    with pytest.raises(ValueError, match="one layer"):
        choose_replicas(torch.tensor([[0]]), p.logical_to_physical, p.replica_count)


def test_identity_placement():
    p = identity_placement(2, 8, 4)
    assert p.physical_to_logical.tolist() == [list(range(8))] * 2
    assert (p.replica_count == 1).all() and p.logical_to_physical.shape == (2, 8, 1)
    with pytest.raises(ValueError, match="not divisible by num_gpus"):
        identity_placement(1, 6, 4)
