"""The expert-parallel dispatcher: experts live on different ranks of a group, and each (token, expert) pair is
computed on one rank that holds its expert.

Who holds what is a *placement*: ``holders()[e]`` lists the ranks holding expert e. Under expert parallelism
it is fixed - rank p holds experts [p * L, (p + 1) * L), L = E / ranks. Under FSSDP an engine materializes
extra copies every step and passes its current placement. A pair goes to this rank when it holds the expert
(local copy first); otherwise to the holders on this rank's node when there are any (``ranks_per_node``), else
to all holders; the rank's pairs of that expert are split evenly over those, starting at a holder that depends
on the rank, so that different ranks' tokens spread over every copy.

One dispatch, in order:
1. sort the local pairs by global expert (the same permutation as on one device) and choose each one's rank;
   stable-sort by rank, so the rows for rank p are one contiguous slice, ordered by expert;
2. exchange the row counts per (rank, expert) - small, and needed to size the token exchange;
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hecate.collectives import Transport, all_to_all_autograd
from hecate.collectives.inflight import all_to_all_start
from hecate.parallel.moe.dispatcher import dispatch_compute_combine
from hecate.parallel.moe.permute import Permutation, permute, sort_by_expert, unpermute

Holders = Sequence[Sequence[int]]  # holders[e]: the ranks holding expert e, ascending
ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_MD sorted by held expert, counts_H) -> y_MD


@dataclass
class ExpertParallelHandle:
    """What combine needs to send the expert outputs back and unpermute them."""

    perm: Permutation  # local pairs sorted by global expert
    by_rank_N: torch.Tensor  # long; the expert-sorted rows in send order are x_ND[by_rank_N]
    order_M: torch.Tensor  # long; the received (source-major) rows in expert-major order are x_MD[order_M]
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
        perm, rank_N, send_counts_PE = self._route(experts_TK, keep_TK, holders)
        recv_counts_PE = self._exchange_counts(send_counts_PE.unsqueeze(1)).squeeze(1)
        handle, counts_H = self._handle(perm, rank_N, send_counts_PE, recv_counts_PE, holders)
        x_ND = permute(x_TD, perm)[handle.by_rank_N]
        x_MD = all_to_all_autograd(x_ND, handle.send_splits, handle.recv_splits, self.transport, name="moe.dispatch")
        return x_MD[handle.order_M], counts_H, handle

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
        y_sent_ND = all_to_all_autograd(_source_major(y_MD, handle), handle.recv_splits, handle.send_splits,
                                        self.transport, name="moe.combine")
        return _unsend(y_sent_ND, weights_TK, handle)

    def run(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: ExpertsFn) -> torch.Tensor:
        """dispatch -> experts -> combine, pipelined over ``overlap_chunks`` token chunks (module docstring)."""
        if self.overlap_chunks == 1:
            return dispatch_compute_combine(self, x_TD, experts_TK, keep_TK, weights_TK, experts)
        holders = self.holders()
        bounds = _chunk_bounds(x_TD.shape[0], self.overlap_chunks)
        keeps = [None if keep_TK is None else keep_TK[a:b] for a, b in bounds]
        routes = [self._route(experts_TK[a:b], keep, holders) for (a, b), keep in zip(bounds, keeps)]
        recv_counts_PCE = self._exchange_counts(torch.stack([send for _, _, send in routes], dim=1))
        handles, sends = [], []
        for c, ((a, b), (perm, rank_N, send_counts_PE)) in enumerate(zip(bounds, routes)):
            handle, counts_H = self._handle(perm, rank_N, send_counts_PE, recv_counts_PCE[:, c], holders)
            handles.append((handle, counts_H))
            sends.append(permute(x_TD[a:b], perm)[handle.by_rank_N])
        dispatched = [self._start(sends[0], handles[0][0], "moe.dispatch")]
        combined = []
        for c, (handle, counts_H) in enumerate(handles):
            if c + 1 < len(handles):
                dispatched.append(self._start(sends[c + 1], handles[c + 1][0], "moe.dispatch"))
            y_MD = experts(dispatched[c].wait()[handle.order_M], counts_H)
            combined.append(all_to_all_start(_source_major(y_MD, handle), handle.recv_splits, handle.send_splits,
                                             self.transport, name="moe.combine"))
        return torch.cat([_unsend(inflight.wait(), weights_TK[a:b], handle)
                          for inflight, (a, b), (handle, _) in zip(combined, bounds, handles)])

    def _start(self, x_ND: torch.Tensor, handle: ExpertParallelHandle, name: str):
        return all_to_all_start(x_ND, handle.send_splits, handle.recv_splits, self.transport, name=name)

    def _route(self, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None,
               holders: Holders) -> tuple[Permutation, torch.Tensor, torch.Tensor]:
        """(expert-sorted pairs, the rank of each, rows per (rank, expert) to send)."""
        ranks, experts = self.transport.world_size, self.num_experts
        perm = sort_by_expert(experts_TK, keep_TK, experts)
        rank_N = self._choose_ranks(perm.counts_E.tolist(), holders, experts_TK.device)
        expert_N = torch.repeat_interleave(torch.arange(experts, device=experts_TK.device), perm.counts_E)
        send_counts_PE = torch.bincount(rank_N * experts + expert_N, minlength=ranks * experts).view(ranks, experts)
        return perm, rank_N, send_counts_PE

    def _exchange_counts(self, send_counts_PCE: torch.Tensor) -> torch.Tensor:
        """Rows per (source rank, chunk, expert) this rank will receive: one small exchange for all chunks."""
        ranks = self.transport.world_size
        recv_counts_PCE = torch.empty_like(send_counts_PCE)
        self.transport.all_to_all(recv_counts_PCE, send_counts_PCE.contiguous(), [1] * ranks, [1] * ranks,
                                  name="moe.counts").wait()
        return recv_counts_PCE

    def _handle(self, perm: Permutation, rank_N: torch.Tensor, send_counts_PE: torch.Tensor,
                recv_counts_PE: torch.Tensor, holders: Holders) -> tuple[ExpertParallelHandle, torch.Tensor]:
        ranks, experts = self.transport.world_size, self.num_experts
        by_rank_N = torch.argsort(rank_N, stable=True)  # stable: expert order within each destination
        expert_of_M = torch.arange(experts, device=rank_N.device).repeat(ranks).repeat_interleave(
            recv_counts_PE.flatten())
        order_M = torch.argsort(expert_of_M, stable=True)  # stable: source-rank order within each expert
        held = [e for e in range(experts) if self.transport.rank in holders[e]]
        counts_H = recv_counts_PE.sum(0)[held]
        handle = ExpertParallelHandle(perm, by_rank_N, order_M, send_counts_PE.sum(1).tolist(),
                                      recv_counts_PE.sum(1).tolist())
        return handle, counts_H

    def _choose_ranks(self, counts_E: list[int], holders: Holders, device: torch.device) -> torch.Tensor:
        """rank_N for the expert-sorted pairs: this rank when it holds the expert, else an even split of the
        expert's pairs over its holders (those on this node if any), rotated by this rank's index."""
        me, per_node = self.transport.rank, self.ranks_per_node
        parts = []
        for expert, count in enumerate(counts_E):
            ranks = holders[expert]
            if per_node and me not in ranks:
                near = [r for r in ranks if r // per_node == me // per_node]
                ranks = near or ranks
            if me in ranks or len(ranks) == 1:
                target = me if me in ranks else ranks[0]
                parts.append(torch.full((count,), target, dtype=torch.long, device=device))
                continue
            shares = [count // len(ranks) + (i < count % len(ranks)) for i in range(len(ranks))]
            rotated = [ranks[(i + me) % len(ranks)] for i in range(len(ranks))]
            parts.append(torch.repeat_interleave(torch.tensor(rotated, device=device),
                                                 torch.tensor(shares, device=device)))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _source_major(y_MD: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
    """Undo step 4: expert-major rows back to (source rank, expert) order for the return exchange."""
    return y_MD.new_empty(y_MD.shape).index_copy(0, handle.order_M, y_MD)


def _unsend(y_sent_ND: torch.Tensor, weights_TK: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
    """Undo steps 1 (send order) and the expert sort, and mix the pairs with the router weights."""
    y_ND = y_sent_ND.new_empty(y_sent_ND.shape).index_copy(0, handle.by_rank_N, y_sent_ND)
    return unpermute(y_ND, weights_TK, handle.perm)


def _chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous token ranges of near-equal size (empty ones when there are fewer tokens)."""
    edges = [tokens * c // chunks for c in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))
