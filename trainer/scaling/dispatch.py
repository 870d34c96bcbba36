"""Which rank computes each (token, expert) pair, counted instead of listed: the dispatcher's rule
(:meth:`hecate.parallel.moe.ep_dispatcher.ExpertParallelDispatcher._choose_ranks`) applied to per-expert counts.

Why a copy of the rule: the dispatcher decides pair by pair on tensors (one tensor op per expert and rank), which
at 1024 simulated ranks costs seconds per layer and step. ``tests/test_scaling.py`` checks on random placements
that these counts equal a bincount of the dispatcher's own choice, so the two cannot drift apart.

The rule: a pair stays on its source rank when that rank holds the expert; otherwise it goes to the holders on
the source's node when there are any (``ranks_per_node``), else to all holders; a source's pairs of one expert
are split evenly over those holders (the first ``count % n`` get one more), starting at the holder with
index (source mod n).

Shapes: R source ranks = D devices of the group, E experts.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dispatch_rows(counts_RE: np.ndarray, holders_E: Sequence[Sequence[int]],
                  ranks_per_node: int | None = None) -> np.ndarray:
    """rows_RD[r, d]: pairs source rank r sends to device d (d == r: computed where they are)."""
    ranks, experts = counts_RE.shape
    rows_RD = np.zeros((ranks, ranks), dtype=np.int64)
    sources_R = np.arange(ranks)
    node_R = sources_R // ranks_per_node if ranks_per_node else np.zeros(ranks, dtype=np.int64)
    for expert in range(experts):
        holders = np.asarray(holders_E[expert], dtype=np.int64)
        count_R = counts_RE[:, expert]
        holds_R = np.isin(sources_R, holders)
        rows_RD[sources_R[holds_R], sources_R[holds_R]] += count_R[holds_R]
        for node in np.unique(node_R[~holds_R]):
            near = holders[node_R[holders] == node] if ranks_per_node else holders
            targets = near if len(near) else holders
            group_R = sources_R[~holds_R & (node_R == node)]
            _split(rows_RD, group_R, count_R[group_R], targets)
    return rows_RD


def _split(rows_RD: np.ndarray, sources: np.ndarray, count_R: np.ndarray, targets: np.ndarray) -> None:
    n = len(targets)
    for i in range(n):
        share_R = count_R // n + (i < count_R % n)
        np.add.at(rows_RD, (sources, targets[(i + sources) % n]), share_R)
