"""The expert-parallel dispatcher: the experts of a layer are split over the ranks of the EP group.

Rank p of the group holds experts [p * L, (p + 1) * L), L = E / ep. One dispatch, in order:
1. sort the local (token, k) pairs by global expert (the same permutation as on one device); the rows for rank p
   are then one contiguous slice;
2. exchange the row counts per (rank, local expert) - small, and needed to size the token exchange;
3. exchange the rows with a variable all-to-all (autograd-aware: backward is the reverse exchange);
4. reorder the received rows from (source rank, local expert) to (local expert, source rank), so that each local
   expert's rows are one slice and expert compute is one batched matmul chain per expert.
Combine undoes 4, 3 and 1 and mixes the expert outputs with the router weights.

Shapes: T tokens, D model dim, E experts, L local experts, K experts per token, N kept local pairs sorted by
expert, M rows received (grouped by source rank), P ranks of the EP group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hecate.collectives import Transport, all_to_all_autograd
from hecate.parallel.moe.permute import Permutation, permute, sort_by_expert, unpermute


@dataclass
class ExpertParallelHandle:
    """What combine needs to send the expert outputs back and unpermute them."""

    perm: Permutation  # local pairs sorted by global expert
    order_M: torch.Tensor  # long; the received (source-major) rows in expert-major order are x_MD[order_M]
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank


class ExpertParallelDispatcher:
    """Dispatch and combine across the EP group of ``transport``; holds no weights."""

    def __init__(self, num_experts: int, transport: Transport):
        if num_experts % transport.world_size:
            raise ValueError(f"{num_experts} experts cannot be split over {transport.world_size} ranks")
        self.num_experts = num_experts
        self.transport = transport
        self.local_experts = num_experts // transport.world_size

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelHandle]:
        ranks, local = self.transport.world_size, self.local_experts
        perm = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        x_ND = permute(x_TD, perm)
        send_counts_PL = perm.counts_E.view(ranks, local)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        self.transport.all_to_all(recv_counts_PL, send_counts_PL.contiguous(), [1] * ranks, [1] * ranks,
                                  name="moe.counts").wait()
        send_splits, recv_splits = send_counts_PL.sum(1).tolist(), recv_counts_PL.sum(1).tolist()
        x_MD = all_to_all_autograd(x_ND, send_splits, recv_splits, self.transport, name="moe.dispatch")
        expert_of_M = torch.arange(local, device=x_TD.device).repeat(ranks).repeat_interleave(
            recv_counts_PL.flatten())
        order_M = torch.argsort(expert_of_M, stable=True)  # stable: source-rank order within each expert
        handle = ExpertParallelHandle(perm, order_M, send_splits, recv_splits)
        return x_MD[order_M], recv_counts_PL.sum(0), handle

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, handle: ExpertParallelHandle) -> torch.Tensor:
        y_source_major_MD = y_MD.new_empty(y_MD.shape).index_copy(0, handle.order_M, y_MD)
        y_ND = all_to_all_autograd(y_source_major_MD, handle.recv_splits, handle.send_splits, self.transport,
                                   name="moe.combine")
        return unpermute(y_ND, weights_TK, handle.perm)
