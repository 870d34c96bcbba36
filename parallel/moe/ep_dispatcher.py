"""The expert-parallel dispatcher: experts live on different ranks of a group, and each (token, expert) pair is
computed on one rank that holds its expert.

Who holds what is a *placement*: ``holders()[e]`` lists the ranks holding expert e. Under expert parallelism
it is fixed - rank p holds experts [p * L, (p + 1) * L), L = E / ranks. Under FSSDP an engine materializes
extra copies every step and passes its current placement. Which copy computes each pair is decided from the
whole group's counts (:mod:`hecate.parallel.moe.assignment`): device totals levelled first, then local copy,
same node (``ranks_per_node``), remote.

One dispatch, in order:
1. sort the local pairs by global expert (the same permutation as on one device);
2. all-gather the pair counts per (rank, expert) - small; every rank derives the same assignment from them,
   so the rows it sends and receives need no second exchange; stable-sort the pairs by destination rank, so
   the rows for rank p are one contiguous slice, ordered by expert;
3. exchange the rows with a variable all-to-all (autograd-aware: backward is the reverse exchange);
4. reorder the received rows from (source rank, expert) to (expert, source rank), so that each held expert's
   rows are one slice and expert compute is one batched matmul chain per expert.
Combine undoes 4, 3 and 1 and mixes the expert outputs with the router weights.

Overlap (``overlap_chunks`` C > 1, ``moe.overlap_chunks``): the tokens are cut into C contiguous chunks, each
dispatched as above (one exchange of the counts of all chunks), and the chunks are pipelined:

    issue dispatch 0, 1 | wait 0, experts 0, issue combine 0, issue dispatch 2 | wait 1, experts 1, ...

so the all-to-all of chunk i+1 travels while the experts compute chunk i, and the combine of chunk i travels
while chunk i+1 computes. Backward mirrors it (``collectives/inflight.py``): the autograd engine computes chunk
i's expert backward while chunk i+1's gradient rows travel back. Each row is computed by the same expert with the
same weights as without chunks, so results agree to the float tolerance of matmuls over fewer rows (tested).
Every rank issues and waits the exchanges in the same order, as the transports require. C = 1 is the plain path.

Shapes: T tokens, D model dim, E experts, K experts per token, N kept local pairs, M rows received, P ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hecate.collectives import Transport, all_to_all_autograd
from hecate.collectives.inflight import all_to_all_start
from hecate.parallel.moe.assignment import Holders, assign_pairs
from hecate.parallel.moe.dispatcher import dispatch_compute_combine
from hecate.parallel.moe.permute import (Permutation, inverse_permutation, permute, reordered, sort_by_expert,
                                         unpermute)

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_MD sorted by held expert, counts_H) -> y_MD


@dataclass
class ExpertParallelHandle:
    """What combine needs to send the expert outputs back and unpermute them."""

    perm: Permutation  # local pairs in send order: by destination rank, by global expert within
    order_M: torch.Tensor  # long; the received (source-major) rows in expert-major order are x_MD[order_M]
    source_order_M: torch.Tensor  # long; its inverse: the expert-major rows back in source-major order
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank


def block_holders(num_experts: int, ranks: int) -> Holders:
    """Expert parallelism's placement: contiguous blocks of E / ranks experts per rank."""
    local = num_experts // ranks
    return tuple((e // local,) for e in range(num_experts))


class ExpertParallelDispatcher:
    """Dispatch and combine across the group of ``transport``; holds no weights. The experts module must compute
    the experts this rank holds, in ascending order, with the per-expert row counts dispatch returns."""

    def __init__(self, num_experts: int, transport: Transport, holders: Callable[[], Holders] | None = None,
                 ranks_per_node: int | None = None, overlap_chunks: int = 1):
        if overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1 (1 = no overlap), got {overlap_chunks}")
        if holders is None:
            if num_experts % transport.world_size:
                raise ValueError(f"{num_experts} experts cannot be split over {transport.world_size} ranks")
            fixed = block_holders(num_experts, transport.world_size)
            holders = lambda: fixed  # noqa: E731
        self.num_experts = num_experts
        self.transport = transport
        self.holders = holders
        self.ranks_per_node = ranks_per_node
        self.overlap_chunks = overlap_chunks

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelHandle]:
        holders = self.holders()
        perm = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        counts_PE = self._gather_counts(perm.counts_E.unsqueeze(0)).squeeze(1)
        handle, counts_H = self._handle(perm, counts_PE, holders)
        x_ND = permute(x_TD, handle.perm)
        x_MD = all_to_all_autograd(x_ND, handle.send_splits, handle.recv_splits, self.transport, name="moe.dispatch")
        return x_MD.index_select(0, handle.order_M), counts_H, handle

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
        y_sent_ND = all_to_all_autograd(_source_major(y_MD, handle), handle.recv_splits, handle.send_splits,
                                        self.transport, name="moe.combine")
        return unpermute(y_sent_ND, weights_TK, handle.perm)

    def run(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: ExpertsFn) -> torch.Tensor:
        """dispatch -> experts -> combine, pipelined over ``overlap_chunks`` token chunks (module docstring)."""
        if self.overlap_chunks == 1:
            return dispatch_compute_combine(self, x_TD, experts_TK, keep_TK, weights_TK, experts)
        holders = self.holders()
        bounds = _chunk_bounds(x_TD.shape[0], self.overlap_chunks)
        keeps = [None if keep_TK is None else keep_TK[a:b] for a, b in bounds]
        perms = [sort_by_expert(experts_TK[a:b], keep, self.num_experts) for (a, b), keep in zip(bounds, keeps)]
        counts_PCE = self._gather_counts(torch.stack([perm.counts_E for perm in perms]))
        handles, sends = [], []
        for c, ((a, b), perm) in enumerate(zip(bounds, perms)):
            handle, counts_H = self._handle(perm, counts_PCE[:, c], holders)
            handles.append((handle, counts_H))
            sends.append(permute(x_TD[a:b], handle.perm))
        dispatched = [self._start(sends[0], handles[0][0], "moe.dispatch")]
        combined = []
        for c, (handle, counts_H) in enumerate(handles):
            if c + 1 < len(handles):
                dispatched.append(self._start(sends[c + 1], handles[c + 1][0], "moe.dispatch"))
            y_MD = experts(dispatched[c].wait().index_select(0, handle.order_M), counts_H)
            combined.append(all_to_all_start(_source_major(y_MD, handle), handle.recv_splits, handle.send_splits,
                                             self.transport, name="moe.combine"))
        return torch.cat([unpermute(inflight.wait(), weights_TK[a:b], handle.perm)
                          for inflight, (a, b), (handle, _) in zip(combined, bounds, handles)])

    def _start(self, x_ND: torch.Tensor, handle: ExpertParallelHandle, name: str):
        return all_to_all_start(x_ND, handle.send_splits, handle.recv_splits, self.transport, name=name)

    def _gather_counts(self, counts_CE: torch.Tensor) -> torch.Tensor:
        """Pair counts per (rank, chunk, expert) of the whole group: one small all-gather for all chunks."""
        ranks = self.transport.world_size
        counts_PCE = counts_CE.new_empty((ranks, *counts_CE.shape))
        self.transport.all_gather(counts_PCE, counts_CE.unsqueeze(0).contiguous(), name="moe.counts").wait()
        return counts_PCE

    def _handle(self, perm: Permutation, counts_PE: torch.Tensor,
                holders: Holders) -> tuple[ExpertParallelHandle, torch.Tensor]:
        ranks, experts, me = self.transport.world_size, self.num_experts, self.transport.rank
        rows_PEQ = _rows_by_source_expert_destination(counts_PE, holders, self.ranks_per_node)
        send_counts_PE, recv_counts_PE = rows_PEQ[me].T, rows_PEQ[:, :, me]
        device = perm.counts_E.device
        rank_N = torch.repeat_interleave(torch.arange(ranks, device=device).repeat(experts),
                                         rows_PEQ[me].flatten().to(device))  # expert-sorted pairs' destinations
        by_rank_N = torch.argsort(rank_N, stable=True)  # stable: expert order within each destination
        expert_of_M = torch.arange(experts, device=device).repeat(ranks).repeat_interleave(
            recv_counts_PE.flatten().to(device))
        order_M = torch.argsort(expert_of_M, stable=True)  # stable: source-rank order within each expert
        held = [e for e in range(experts) if me in holders[e]]
        counts_H = recv_counts_PE.sum(0)[held].to(device)
        handle = ExpertParallelHandle(reordered(perm, by_rank_N), order_M, inverse_permutation(order_M),
                                      send_counts_PE.sum(1).tolist(), recv_counts_PE.sum(1).tolist())
        return handle, counts_H


def _rows_by_source_expert_destination(counts_PE: torch.Tensor, holders: Holders,
                                       ranks_per_node: int | None) -> torch.Tensor:
    """rows_PEQ[p, e, q]: pairs of expert e that source p sends to rank q (the group-wide assignment)."""
    ranks, experts = counts_PE.shape
    rows_PEQ = np.zeros((ranks, experts, ranks), dtype=np.int64)
    for e, rows_PH in enumerate(assign_pairs(counts_PE.cpu().numpy(), holders, ranks_per_node)):
        rows_PEQ[:, e, list(holders[e])] = rows_PH
    return torch.from_numpy(rows_PEQ)


def _source_major(y_MD: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
    """Undo step 4: expert-major rows back to (source rank, expert) order for the return exchange."""
    return y_MD.index_select(0, handle.source_order_M)


def _chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous token ranges of near-equal size (empty ones when there are fewer tokens)."""
    edges = [tokens * c // chunks for c in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))
