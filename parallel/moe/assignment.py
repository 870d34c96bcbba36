"""Which holder computes each (token, expert) pair when experts have several copies: a pure function of the
group's per-rank counts, so that every rank computes the same answer from the same all-gathered counts.

Why balance first: a replica is only worth its bytes if it takes work off the busiest device. Keeping every pair
on a local copy (the obvious rule) can make things worse - under balanced routing, replicating rank 0's two
hottest experts onto rank 1 would move rank 1's pairs of them from rank 0 to rank 1 and leave rank 1 with 10/16 of
the work. So the quotas come first, the locality second:

1. quotas: experts with one holder put all their pairs on it; then the replicated experts, hottest first, are
   water-filled over their holders - each copy gets rows until the holders' device totals are level;
2. matching: each holder's quota is filled with its own pairs first, then with pairs from sources on its node
   (``ranks_per_node``), then from any source - sources and holders in ascending rank order.

Shapes: P ranks of the group (sources and destinations), E experts, H holders of one expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Holders = Sequence[Sequence[int]]  # holders[e]: the ranks holding expert e, ascending


def assign_pairs(counts_PE: np.ndarray, holders: Holders, ranks_per_node: int | None = None) -> list[np.ndarray]:
    """rows_PH per expert: pairs of expert e that source rank p sends to its h-th holder (``holders[e][h]``)."""
    counts_PE = np.asarray(counts_PE, dtype=np.int64)
    ranks, experts = counts_PE.shape
    quotas = _quotas(counts_PE.sum(0), holders, ranks)
    node_P = np.arange(ranks) // ranks_per_node if ranks_per_node else np.zeros(ranks, dtype=np.int64)
    return [_match(counts_PE[:, e].copy(), np.asarray(holders[e]), quotas[e], node_P) for e in range(experts)]


def rows_by_destination(counts_PE: np.ndarray, holders: Holders, ranks_per_node: int | None = None) -> np.ndarray:
    """rows_PQ[p, q]: pairs source p sends to rank q, summed over experts (q == p: computed where they are)."""
    counts_PE = np.asarray(counts_PE, dtype=np.int64)
    rows_PQ = np.zeros((counts_PE.shape[0],) * 2, dtype=np.int64)
    for e, rows_PH in enumerate(assign_pairs(counts_PE, holders, ranks_per_node)):
        rows_PQ[:, list(holders[e])] += rows_PH
    return rows_PQ


def _quotas(total_E: np.ndarray, holders: Holders, ranks: int) -> list[np.ndarray]:
    """quota_H per expert: rows each holder computes, device totals levelled hottest replicated expert first."""
    load_P = np.zeros(ranks, dtype=np.int64)
    quotas: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(holders)
    for e, hs in enumerate(holders):
        if len(hs) == 1:
            quotas[e] = np.array([total_E[e]], dtype=np.int64)
            load_P[hs[0]] += total_E[e]
    replicated = sorted((e for e, hs in enumerate(holders) if len(hs) > 1), key=lambda e: (-total_E[e], e))
    for e in replicated:
        hs = np.asarray(holders[e])
        quotas[e] = _water_fill(int(total_E[e]), load_P[hs])
        load_P[hs] += quotas[e]
    return quotas


def _water_fill(total: int, level_H: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` that raise the lowest levels first; leftover rows go to the lowest holders
    (ties: the earlier holder)."""
    order = np.lexsort((np.arange(len(level_H)), level_H))
    levels = level_H[order]
    k = len(levels)
    for n in range(1, len(levels) + 1):  # fill the n lowest up to a common level; stop when it stays below the next
        if n == len(levels) or (total + levels[:n].sum()) / n <= levels[n]:
            k = n
            break
    target = (total + levels[:k].sum()) // k
    share = np.zeros(len(levels), dtype=np.int64)
    share[:k] = np.maximum(target - levels[:k], 0)
    leftover = total - share.sum()
    share[:leftover] += 1  # leftover < k: one more row for the first holders in level order
    quota_H = np.zeros(len(levels), dtype=np.int64)
    quota_H[order] = share
    return quota_H


def _match(count_P: np.ndarray, holders_H: np.ndarray, quota_H: np.ndarray, node_P: np.ndarray) -> np.ndarray:
    """rows_PH meeting each holder's quota: own pairs, then same-node sources, then any (ascending ranks)."""
    rows_PH = np.zeros((len(count_P), len(holders_H)), dtype=np.int64)
    if len(holders_H) == 1:  # one copy: every pair goes to it (most experts; keeps the scale simulator fast)
        rows_PH[:, 0] = count_P
        return rows_PH
    quota_H = quota_H.copy()
    own = np.minimum(count_P[holders_H], quota_H)
    rows_PH[holders_H, np.arange(len(holders_H))] = own
    count_P[holders_H] -= own
    quota_H -= own
    for node in np.unique(node_P[holders_H]):  # nodes without a holder have no quota to fill
        sources, near = node_P == node, node_P[holders_H] == node
        _fill(rows_PH, count_P, quota_H, sources, near)
    _fill(rows_PH, count_P, quota_H, np.ones(len(count_P), bool), np.ones(len(holders_H), bool))
    return rows_PH


def _fill(
    rows_PH: np.ndarray, count_P: np.ndarray, quota_H: np.ndarray, sources: np.ndarray, holders: np.ndarray
) -> None:
    """Pour the selected sources' remaining rows into the selected holders' remaining quotas, both in order: row
    intervals [a_p, b_p) of the sources against quota intervals [c_h, d_h); each overlap is a transfer."""
    src = np.flatnonzero(sources & (count_P > 0))
    dst = np.flatnonzero(holders & (quota_H > 0))
    if not len(src) or not len(dst):
        return
    end_P, end_H = np.cumsum(count_P[src]), np.cumsum(quota_H[dst])
    start_P, start_H = end_P - count_P[src], end_H - quota_H[dst]
    moved = np.maximum(np.minimum(end_P[:, None], end_H[None, :]) - np.maximum(start_P[:, None], start_H[None, :]), 0)
    rows_PH[np.ix_(src, dst)] += moved
    count_P[src] -= moved.sum(1)
    quota_H[dst] -= moved.sum(0)
