"""The group-wide assignment of (token, expert) pairs to expert copies: every pair placed exactly once, device
totals levelled where copies allow it, local copies used before remote ones, and replicas that can only hurt
balance left idle."""

from __future__ import annotations

import numpy as np
import pytest

from hecate.parallel.moe.assignment import assign_pairs, rows_by_destination


def test_balanced_routing_stays_balanced_when_one_rank_holds_extra_copies():
    """Rank 0 owns experts 0-3, rank 1 experts 4-7 and copies of 0 and 1: a local-first rule would give rank 1
    10/16 of the work; levelling keeps 8/16 each."""
    counts_PE = np.full((2, 8), 512)
    holders = [(0, 1), (0, 1), (0,), (0,), (1,), (1,), (1,), (1,)]
    assert rows_by_destination(counts_PE, holders).sum(0).tolist() == [4096, 4096]


def test_hot_expert_is_split_to_level_the_devices_and_local_rows_stay_home():
    counts_PE = np.array([[300, 10, 10, 10], [300, 10, 10, 10]])  # expert 0 is hot, owned by rank 0
    holders = [(0, 1), (0,), (1,), (1,)]
    rows_PH = assign_pairs(counts_PE, holders)[0]
    total_D = rows_by_destination(counts_PE, holders).sum(0)
    assert total_D.tolist() == [330, 330]
    assert rows_PH.tolist() == [[300, 0], [10, 290]]  # quotas 310 / 290, each filled with its own rank's pairs first


@pytest.mark.parametrize("ranks_per_node", [None, 2])
def test_every_pair_is_placed_once_on_a_holder(ranks_per_node):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ranks = 4
        experts = 8
        counts_PE = rng.integers(0, 60, (ranks, experts))
        holders = [
            tuple(sorted({e // 2} | set(rng.choice(ranks, rng.integers(0, ranks + 1)).tolist())))
            for e in range(experts)
        ]
        rows = assign_pairs(counts_PE, holders, ranks_per_node)
        for e, rows_PH in enumerate(rows):
            assert rows_PH.shape == (ranks, len(holders[e])) and (rows_PH >= 0).all()
            assert rows_PH.sum(1).tolist() == counts_PE[:, e].tolist()
        everywhere = [tuple(range(ranks))] * experts  # every expert on every rank: totals level to one row
        total_D = rows_by_destination(counts_PE, everywhere, ranks_per_node).sum(0)
        assert total_D.max() - total_D.min() <= 1


def test_same_node_holder_is_preferred_over_a_remote_one():
    counts_PE = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [40, 0, 0, 0]])  # only rank 3 routes to expert 0
    holders = [(0, 2), (1,), (2,), (3,)]  # copies of expert 0 on rank 0 (node 0) and rank 2 (node 1 with rank 3)
    rows_PH = assign_pairs(counts_PE, holders, ranks_per_node=2)[0]
    # levelling gives both copies 20 rows; rank 3's pairs fill its node's copy (rank 2) first
    assert rows_PH[3].tolist() == [20, 20]
    counts_PE[3, 3] = 30  # rank 3 is busy with its own expert: the copy on rank 2's node stays preferred
    assert assign_pairs(counts_PE, holders, ranks_per_node=2)[0][3].tolist() == [20, 20]
