"""Who sends which rows to whom, in which overlap chunk: a pure function of the group's all-gathered counts.

Every rank derives the same tables from the same counts, so the rows it sends and receives need no second
exchange. Chunks are cut on the receiving side: chunk c holds the c-th of C near-equal ranges of the rows rank q
receives, expert by expert (a cut moved to an expert boundary when one is near). A chunk is therefore a run of
whole experts, cut inside an expert only at its two ends (and there across every source's rows alike): each
rank's expert GEMMs stay whole except where one of the C - 1 cuts falls. (Cutting the *tokens* into chunks
instead splits every expert C ways: smaller GEMMs and a weight gradient per chunk - measured 27% more GEMM time
with C = 4 on this CPU, docs/BENCHMARKS.md.) With C = 1 there is one chunk holding everything: the plain
exchange.

Shapes: P ranks (as sources p, as destinations q), E experts, C chunks, H experts held by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecate.parallel.moe.assignment import Holders, assign_pairs

SNAP = 0.25  # a cut moves to an expert boundary this close (share of a chunk's rows): whole GEMMs over balance


@dataclass
class ChunkRoute:
    """This rank's part of one chunk's exchange."""

    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_counts_PE: np.ndarray  # rows received per (source, expert), in arrival order: source-major
    first: int  # position among the held experts of the chunk's first expert
    counts: list[int]  # rows of held experts first, first + 1, ... (a run; zero-row experts included)


@dataclass
class Routes:
    send_EQC: np.ndarray  # this rank's pairs of expert e sent to rank q in chunk c; within an expert the pairs
    # (in token order) go to ranks in ascending order and, within a rank, to chunks in ascending order
    chunks: list[ChunkRoute]


def plan_routes(
    counts_PE: np.ndarray, holders: Holders, rank: int, chunks: int, ranks_per_node: int | None = None
) -> Routes:
    """The routes of ``rank`` from the whole group's pair counts per (source rank, expert)."""
    rows_PEQC = rows_by_chunk(rows_by_source_expert_destination(counts_PE, holders, ranks_per_node), chunks)
    held = [e for e in range(len(holders)) if rank in holders[e]]
    routes = []
    for c, (first, last) in enumerate(held_runs(rows_PEQC[:, held, rank].sum((0, 2)), chunks)):
        recv_PE = rows_PEQC[:, :, rank, c]
        routes.append(
            ChunkRoute(
                send_splits=rows_PEQC[rank, :, :, c].sum(0).tolist(),
                recv_splits=recv_PE.sum(1).tolist(),
                recv_counts_PE=recv_PE,
                first=first,
                counts=recv_PE[:, held[first : last + 1]].sum(0).tolist(),
            )
        )
    return Routes(rows_PEQC[rank], routes)


def rows_by_source_expert_destination(
    counts_PE: np.ndarray, holders: Holders, ranks_per_node: int | None = None
) -> np.ndarray:
    """rows_PEQ[p, e, q]: pairs of expert e that source p sends to rank q (the group-wide assignment)."""
    ranks, experts = np.shape(counts_PE)
    rows_PEQ = np.zeros((ranks, experts, ranks), dtype=np.int64)
    for e, rows_PH in enumerate(assign_pairs(counts_PE, holders, ranks_per_node)):
        rows_PEQ[:, e, list(holders[e])] = rows_PH
    return rows_PEQ


def chunk_bounds(rows_E: np.ndarray, chunks: int) -> np.ndarray:
    """Where a rank's received rows, expert by expert (``rows_E`` each), are cut into chunks: at total * c // C,
    moved to the nearest expert boundary when one lies within ``SNAP`` of a chunk's rows - so that under
    near-even routing every chunk's experts are whole (no GEMM cut in two), at a small cost in balance. Moves of at
    most a quarter chunk keep the cuts in order."""
    ends = np.concatenate([[0], np.cumsum(rows_E)])
    total = int(ends[-1])
    bounds = total * np.arange(chunks + 1) // chunks
    nearest = ends[np.abs(ends[None, :] - bounds[:, None]).argmin(1)]
    return np.where(np.abs(nearest - bounds) <= SNAP * total / chunks, nearest, bounds)


def rows_by_chunk(rows_PEQ: np.ndarray, chunks: int) -> np.ndarray:
    """rows_PEQC[p, e, q, c]: the rows of rows_PEQ[p, e, q] that travel in chunk c, rank q's rows cut by
    :func:`chunk_bounds`. An expert that a cut falls in is cut at the same fraction of every source's rows
    (rounded down), so each chunk's exchange draws on every source, as a token chunk would."""
    ranks, experts, _ = rows_PEQ.shape
    rows_QEP = rows_PEQ.transpose(2, 1, 0)
    length_QE = rows_QEP.sum(2)
    start_QE = np.cumsum(length_QE, axis=1) - length_QE
    bounds_QB = np.stack([chunk_bounds(length_E, chunks) for length_E in length_QE])
    # how far into each expert every cut falls, 0 .. its length; each source gets that fraction of its rows
    into_QEB = np.clip(bounds_QB[:, None, :] - start_QE[..., None], 0, length_QE[..., None])
    cut_QEPB = rows_QEP[..., None] * into_QEB[:, :, None, :] // np.maximum(length_QE, 1)[..., None, None]
    return np.diff(cut_QEPB, axis=3).transpose(2, 1, 0, 3)


def held_runs(rows_H: np.ndarray, chunks: int) -> list[tuple[int, int]]:
    """(first, last) held expert each chunk computes, given the rows of each held expert (``rows_by_chunk``'s
    cuts). A chunk takes every expert its row range meets; an expert with no rows goes to the chunk its position
    falls in (the last chunk at the very end), so every held expert is computed, its weights getting a gradient.
    A chunk whose range is empty (fewer rows than chunks) computes the last held expert on zero rows: every
    chunk's expert call stays an autograd function of its rows, so backward issues its exchanges on every rank."""
    end_H = np.cumsum(rows_H)
    start_H, total = end_H - rows_H, int(rows_H.sum())
    bounds, last = chunk_bounds(rows_H, chunks), len(rows_H) - 1
    runs = []
    for c, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        meets = (rows_H > 0) & (start_H < hi) & (end_H > lo)
        placed = (rows_H == 0) & (((start_H >= lo) & (start_H < hi)) | ((c == chunks - 1) & (start_H == total)))
        members = np.flatnonzero(meets | placed)
        runs.append((int(members[0]), int(members[-1])) if len(members) else (last, last))
    return runs
