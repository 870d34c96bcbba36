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
   so the rows it sends and receives need no second exchange (:mod:`hecate.parallel.moe.routes`); stable-sort
   the pairs by (chunk, destination rank), so the rows for rank p in a chunk are one slice, ordered by expert;
3. exchange the rows with a variable all-to-all, issued by ``start`` and waited by ``compute``, so what the
   caller runs in between travels under it (autograd-aware: backward is the reverse exchange, the same way);
4. reorder the received rows from (source rank, expert) to (expert, source rank), so that each held expert's
   rows are one slice and expert compute is one batched matmul chain per expert.
Combine undoes 4, 3 and 1 and mixes the expert outputs with the router weights.

Overlap (``overlap_chunks`` C > 1, ``moe.overlap_chunks``): the rows each rank receives are cut into C chunks
of near-equal size along its expert-major order, a cut moved to an expert boundary within a quarter chunk, so a
chunk is a run of whole experts, cut (if at all) only at its ends. Each chunk is one exchange, and the chunks
are pipelined:

    start:   issue dispatch 0, 1
    compute: wait 0, experts 0, issue combine 0, issue dispatch 2 | wait 1, experts 1, issue combine 1, ...
    end:     wait the combines, unpermute

so the all-to-all of chunk i+1 travels while the experts compute chunk i, and the combine of chunk i travels
while chunk i+1 computes. Backward mirrors it (``collectives/inflight.py``): the autograd engine computes chunk
i's expert backward while chunk i+1's gradient rows travel back. The experts' weights are unbound once for all
chunks (``ExpertWeights``), so backward stacks their gradients once, as without chunks. Each row is computed by
the same expert with the same weights as without chunks; only an expert cut between two chunks runs two smaller
GEMMs, so results agree to the float tolerance of that (tested). Every rank issues and waits the exchanges in
the same order, as the transports require. C = 1 is one chunk: dispatch, experts, combine.

Shapes: T tokens, D model dim, E experts, K experts per token, N kept local pairs, M rows received, P ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from hecate.collectives import Transport
from hecate.collectives.inflight import InFlight, all_to_all_start
from hecate.parallel.moe.assignment import Holders
from hecate.parallel.moe.dispatcher import ExpertsModule
from hecate.parallel.moe.experts import ExpertWeights
from hecate.parallel.moe.permute import Permutation, inverse_permutation, permute, reordered, sort_by_expert, unpermute
from hecate.parallel.moe.routes import ChunkRoute, plan_routes


@dataclass
class ChunkHandle:
    """One chunk's exchange, with the orders that take its received rows to expert-major and back."""

    route: ChunkRoute
    order_M: torch.Tensor  # long; the received (source-major) rows in expert-major order are x_MD[order_M]
    source_order_M: torch.Tensor  # long; its inverse: the expert-major rows back in source-major order


@dataclass
class ExpertParallelHandle:
    """What combine needs to send the expert outputs back and unpermute them."""

    perm: Permutation  # local pairs in send order: by chunk, by destination rank, by global expert
    chunks: list[ChunkHandle]


@dataclass
class ExpertParallelFlight:
    """One dispatch from ``start`` to ``end``: the rows per chunk and the exchanges issued so far."""

    handle: ExpertParallelHandle
    sends: list[torch.Tensor | None]  # the rows of each chunk not yet issued, in send order
    weights_TK: torch.Tensor
    dispatched: list[InFlight] = field(default_factory=list)
    combined: list[InFlight] = field(default_factory=list)


def block_holders(num_experts: int, ranks: int) -> Holders:
    """Expert parallelism's placement: contiguous blocks of E / ranks experts per rank."""
    local = num_experts // ranks
    return tuple((e // local,) for e in range(num_experts))


class ExpertParallelDispatcher:
    """Dispatch and combine across the group of ``transport``; holds no weights. The experts module must compute
    the experts this rank holds, in ascending order, with the per-expert row counts dispatch returns."""

    def __init__(
        self,
        num_experts: int,
        transport: Transport,
        holders: Callable[[], Holders] | None = None,
        ranks_per_node: int | None = None,
        overlap_chunks: int = 1,
    ):
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

    def start(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, weights_TK: torch.Tensor
    ) -> ExpertParallelFlight:
        """Derive the routes and issue the dispatch of the first two chunks (of the only one when C = 1)."""
        handle = self._handle(x_TD, experts_TK, keep_TK, chunks=self.overlap_chunks)
        sends = permute(x_TD, handle.perm).split([sum(c.route.send_splits) for c in handle.chunks])
        flight = ExpertParallelFlight(handle, list(sends), weights_TK)
        for c in range(min(2, len(handle.chunks))):
            self._issue_dispatch(flight, c)
        return flight

    def compute(self, flight: ExpertParallelFlight, experts: ExpertsModule, weights: ExpertWeights) -> None:
        """Chunk by chunk: wait for its rows, run its experts, issue its combine and the dispatch two chunks on."""
        chunks = flight.handle.chunks
        for c, chunk in enumerate(chunks):
            x_MD = flight.dispatched[c].wait().index_select(0, chunk.order_M)
            counts_H = torch.tensor(chunk.route.counts, device=x_MD.device)
            y_MD = experts(x_MD, counts_H, chunk.route.first, weights)
            flight.combined.append(
                all_to_all_start(
                    y_MD.index_select(0, chunk.source_order_M),
                    chunk.route.recv_splits,
                    chunk.route.send_splits,
                    self.transport,
                    name="moe.combine",
                )
            )
            if c + 2 < len(chunks):
                self._issue_dispatch(flight, c + 2)

    def end(self, flight: ExpertParallelFlight) -> torch.Tensor:
        y_sent_ND = torch.cat([inflight.wait() for inflight in flight.combined])
        return unpermute(y_sent_ND, flight.weights_TK, flight.handle.perm)

    def _issue_dispatch(self, flight: ExpertParallelFlight, c: int) -> None:
        route = flight.handle.chunks[c].route
        flight.dispatched.append(
            all_to_all_start(flight.sends[c], route.send_splits, route.recv_splits, self.transport, name="moe.dispatch")
        )
        flight.sends[c] = None  # the exchange keeps its send buffer until it completes, and no longer

    def _handle(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, chunks: int
    ) -> ExpertParallelHandle:
        """Sort the local pairs by expert, all-gather the pair counts (small), derive every chunk's route from
        them and order the pairs by (chunk, destination, expert), so each chunk's rows for a rank are one slice."""
        ranks, device = self.transport.world_size, x_TD.device
        perm = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        counts_PE = perm.counts_E.new_empty((ranks, self.num_experts))
        self.transport.all_gather(counts_PE, perm.counts_E.unsqueeze(0).contiguous(), name="moe.counts").wait()
        routes = plan_routes(counts_PE.cpu().numpy(), self.holders(), self.transport.rank, chunks, self.ranks_per_node)
        key_EQC = np.broadcast_to(np.arange(chunks) * ranks + np.arange(ranks)[:, None], routes.send_EQC.shape)
        key_N = torch.from_numpy(key_EQC.flatten()).repeat_interleave(torch.from_numpy(routes.send_EQC.flatten()))
        by_chunk_N = torch.argsort(key_N.to(device), stable=True)  # stable: expert order within each slice
        return ExpertParallelHandle(
            reordered(perm, by_chunk_N), [_chunk_handle(route, self.num_experts, device) for route in routes.chunks]
        )


def _chunk_handle(route: ChunkRoute, experts: int, device: torch.device) -> ChunkHandle:
    ranks = len(route.recv_splits)
    expert_of_M = (
        torch.arange(experts, device=device)
        .repeat(ranks)
        .repeat_interleave(torch.from_numpy(route.recv_counts_PE.flatten()).to(device))
    )
    order_M = torch.argsort(expert_of_M, stable=True)  # stable: source-rank order within each expert
    return ChunkHandle(route, order_M, inverse_permutation(order_M))
