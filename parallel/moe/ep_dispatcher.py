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

Shapes: T tokens, D model dim, E experts, K experts per token, N kept local pairs, M rows received, P ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hecate.collectives import Transport, all_to_all_autograd
from hecate.parallel.moe.permute import Permutation, permute, sort_by_expert, unpermute

Holders = Sequence[Sequence[int]]  # holders[e]: the ranks holding expert e, ascending


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
                 ranks_per_node: int | None = None):
        if holders is None:
            if num_experts % transport.world_size:
                raise ValueError(f"{num_experts} experts cannot be split over {transport.world_size} ranks")
            fixed = block_holders(num_experts, transport.world_size)
            holders = lambda: fixed  # noqa: E731
        self.num_experts = num_experts
        self.transport = transport
        self.holders = holders
        self.ranks_per_node = ranks_per_node

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelHandle]:
        ranks, experts = self.transport.world_size, self.num_experts
        holders = self.holders()
        perm = sort_by_expert(experts_TK, keep_TK, experts)
        rank_N = self._choose_ranks(perm.counts_E.tolist(), holders, x_TD.device)
        by_rank_N = torch.argsort(rank_N, stable=True)  # stable: expert order within each destination
        expert_N = torch.repeat_interleave(torch.arange(experts, device=x_TD.device), perm.counts_E)
        send_counts_PE = torch.bincount(rank_N * experts + expert_N, minlength=ranks * experts).view(ranks, experts)
        recv_counts_PE = torch.empty_like(send_counts_PE)
        self.transport.all_to_all(recv_counts_PE, send_counts_PE, [1] * ranks, [1] * ranks,
                                  name="moe.counts").wait()
        send_splits, recv_splits = send_counts_PE.sum(1).tolist(), recv_counts_PE.sum(1).tolist()
        x_ND = permute(x_TD, perm)[by_rank_N]
        x_MD = all_to_all_autograd(x_ND, send_splits, recv_splits, self.transport, name="moe.dispatch")
        expert_of_M = torch.arange(experts, device=x_TD.device).repeat(ranks).repeat_interleave(
            recv_counts_PE.flatten())
        order_M = torch.argsort(expert_of_M, stable=True)  # stable: source-rank order within each expert
        held = [e for e in range(experts) if self.transport.rank in holders[e]]
        counts_H = recv_counts_PE.sum(0)[held]
        return x_MD[order_M], counts_H, ExpertParallelHandle(perm, by_rank_N, order_M, send_splits, recv_splits)

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
        y_source_major_MD = y_MD.new_empty(y_MD.shape).index_copy(0, handle.order_M, y_MD)
        y_sent_ND = all_to_all_autograd(y_source_major_MD, handle.recv_splits, handle.send_splits, self.transport,
                                        name="moe.combine")
        y_ND = y_sent_ND.new_empty(y_sent_ND.shape).index_copy(0, handle.by_rank_N, y_sent_ND)
        return unpermute(y_ND, weights_TK, handle.perm)

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
