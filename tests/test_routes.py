"""The overlap chunks' routes: every rank derives the same tables from the same counts, so what p sends q in a
chunk is what q expects from p; the chunks split each rank's received rows evenly, cut few experts, and a cut
expert is cut across all its sources."""

from __future__ import annotations

import numpy as np
import pytest

from hecate.parallel.moe.ep_dispatcher import block_holders
from hecate.parallel.moe.routes import (
    SNAP,
    chunk_bounds,
    held_runs,
    plan_routes,
    rows_by_chunk,
    rows_by_source_expert_destination,
)

EXPERTS = 8


def _holders(kind: str, ranks: int) -> tuple[tuple[int, ...], ...]:
    if kind == "block":
        return block_holders(EXPERTS, ranks)
    blocks = block_holders(EXPERTS, ranks)  # plus replicas of experts 0 and 5 on every other rank
    return tuple(tuple(range(ranks)) if e in (0, 5) else blocks[e] for e in range(EXPERTS))


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("kind", ["block", "replicas"])
@pytest.mark.parametrize("skew", [0.0, 1.5])
def test_routes_agree_between_ranks_and_split_the_rows_evenly(ranks, chunks, kind, skew):
    rng = np.random.default_rng(ranks * 100 + chunks)
    popularity = np.arange(1, EXPERTS + 1, dtype=float) ** -skew
    counts_PE = np.stack(
        [rng.multinomial(int(rng.integers(0, 400)), popularity / popularity.sum()) for _ in range(ranks)]
    )
    counts_PE[0, 3] = 0  # an expert with no rows from one source
    holders = _holders(kind, ranks)
    rows_PEQ = rows_by_source_expert_destination(counts_PE, holders)
    rows_PEQC = rows_by_chunk(rows_PEQ, chunks)
    np.testing.assert_array_equal(rows_PEQC.sum(3), rows_PEQ)
    routes = [plan_routes(counts_PE, holders, rank, chunks) for rank in range(ranks)]
    for p in range(ranks):
        np.testing.assert_array_equal(routes[p].send_EQC.sum((1, 2)), counts_PE[p])
        for c in range(chunks):
            for q in range(ranks):
                assert routes[p].chunks[c].send_splits[q] == routes[q].chunks[c].recv_splits[p]
    for q, route in enumerate(routes):
        received = [sum(chunk.recv_splits) for chunk in route.chunks]
        assert sum(received) == rows_PEQ[:, :, q].sum()
        even = sum(received) / chunks
        assert all(abs(r - even) <= 2 * SNAP * even + ranks for r in received), f"uneven chunks {received}"
        held = [e for e in range(EXPERTS) if q in holders[e]]
        covered = set()
        for chunk in route.chunks:
            assert sum(chunk.counts) == sum(chunk.recv_splits)
            run = held[chunk.first : chunk.first + len(chunk.counts)]
            assert len(run) == len(chunk.counts), "the run goes past the held experts"
            np.testing.assert_array_equal(chunk.recv_counts_PE[:, run].sum(0), chunk.counts)
            assert chunk.recv_counts_PE.sum() == sum(chunk.counts), "rows of experts outside the run"
            covered |= set(run)
        assert covered == set(held), "a held expert is computed in no chunk (no gradient)"
        runs = sum(len(chunk.counts) for chunk in route.chunks if sum(chunk.counts))
        assert runs <= len(held) + chunks - 1, "more experts cut than chunk boundaries"


def test_a_cut_expert_is_cut_across_every_source():
    rows_PEQ = np.zeros((4, 2, 1), dtype=np.int64)
    rows_PEQ[:, :, 0] = [[10, 10], [10, 10], [10, 10], [10, 10]]  # rank 0 holds both experts, 40 rows of each
    rows_PEQC = rows_by_chunk(rows_PEQ, 4)
    np.testing.assert_array_equal(rows_PEQC[:, 0, 0], [[5, 5, 0, 0]] * 4)  # 20 rows a chunk, 5 from each source
    np.testing.assert_array_equal(rows_PEQC[:, 1, 0], [[0, 0, 5, 5]] * 4)


def test_cuts_move_to_a_near_expert_boundary_only():
    np.testing.assert_array_equal(chunk_bounds(np.array([90, 110, 100, 100]), 4), [0, 90, 200, 300, 400])
    np.testing.assert_array_equal(chunk_bounds(np.array([60, 140, 100, 100]), 4), [0, 100, 200, 300, 400])


def test_one_chunk_is_the_whole_exchange():
    counts_PE = np.array([[5, 0, 2, 1], [1, 1, 0, 7]])
    route = plan_routes(counts_PE, block_holders(4, 2), 1, 1)
    (chunk,) = route.chunks
    assert chunk.first == 0 and chunk.counts == [2, 8]
    assert chunk.send_splits == [2, 7] and chunk.recv_splits == [3, 7]


def test_held_runs_cut_inside_experts_only_at_chunk_ends():
    assert held_runs(np.array([4, 4, 4, 4]), 2) == [(0, 1), (2, 3)]
    assert held_runs(np.array([8, 0, 4, 4]), 4) == [(0, 0), (0, 0), (1, 2), (3, 3)]
    assert held_runs(np.array([3, 0]), 1) == [(0, 1)]
    assert held_runs(np.array([1, 0]), 3) == [(1, 1), (1, 1), (0, 1)]  # empty chunks: an expert on zero rows
