"""SparseAllGather and SparseReduceScatter: move expert-sized chunks between an owner placement P0 and a
materialized placement P1, with traffic proportional to the replicas, in one batch of point-to-point
operations (``chunk_exchange.py``).

On each device the caller holds a dict ``chunk id -> tensor`` of the chunks that device has:
- ``SparseAllGather(P0 -> P1)``: give the chunks this device owns; get the replicas it receives.
- ``SparseReduceScatter(P1 -> P0)``: give every copy this device holds in P1; get, for each chunk it owns,
  the sum of all copies (its own included).
Both compile their plan once (cached per placements and specs) in the constructor, which raises the same
:class:`CollectiveError` on every rank for bad placements; a mismatch in one rank's local chunks is raised on
every rank after one tiny agreement all-gather (``validate=True``), before any chunk data moves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hecate.collectives.chunk_exchange import ChunkExchange, Received
from hecate.collectives.handle import Handle
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.collectives.plan import ChunkSpec, gather_plan, normalize_specs, reduce_scatter_plan
from hecate.collectives.transport import Transport

_ACCUMULATE_IN = {torch.bfloat16: torch.float32, torch.float16: torch.float32}  # sum low precision in fp32


class SparseAllGather:
    """Every chunk reaches every device P1 lists for it, copied from its owner in P0."""

    name = "sparse_all_gather"

    def __init__(
        self,
        owner: OwnerPlacement,
        materialized: MaterializedPlacement,
        specs: ChunkSpec | Sequence[ChunkSpec],
        transport: Transport,
        *,
        device: torch.device | str = "cpu",
        validate: bool = True,
    ):
        specs = normalize_specs(specs, owner.num_chunks)
        self.plan = gather_plan(owner, materialized, specs)
        self.owned = owner.chunks_on(transport.rank)
        self.receives = tuple(c for c in materialized.chunks_on(transport.rank) if c not in self.owned)
        self._exchange = ChunkExchange(self.plan, transport, self.name, torch.device(device), validate)

    def start(self, owned_chunks: Mapping[int, torch.Tensor]) -> Handle[dict[int, torch.Tensor]]:
        """Issue the gather; ``wait()`` returns ``{chunk: replica}`` for the chunks this device receives."""
        return self._exchange.start(owned_chunks, self.owned).then(_replicas)

    def __call__(self, owned_chunks: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.start(owned_chunks).wait()

    def release(self, replicas: Mapping[int, torch.Tensor]) -> None:
        """Let a later call reuse the memory of ``replicas`` (from an earlier call), which must not be used
        afterwards, views of them included. Optional: unreleased replicas are freed as usual."""
        for replica in replicas.values():  # views of one receive buffer, or their own copies (see _typed)
            self._exchange.recv_pool.give(replica)


def _replicas(received: Received) -> dict[int, torch.Tensor]:
    return {chunk: tensor for _, chunk, tensor in received.copies}


class SparseReduceScatter:
    """Every owner receives the sum of all copies of its chunk in P1, its own copy included."""

    name = "sparse_reduce_scatter"

    def __init__(
        self,
        owner: OwnerPlacement,
        materialized: MaterializedPlacement,
        specs: ChunkSpec | Sequence[ChunkSpec],
        transport: Transport,
        *,
        device: torch.device | str = "cpu",
        validate: bool = True,
    ):
        specs = normalize_specs(specs, owner.num_chunks)
        self.plan = reduce_scatter_plan(owner, materialized, specs)
        self.held = materialized.chunks_on(transport.rank)
        self.owned = owner.chunks_on(transport.rank)
        self._exchange = ChunkExchange(self.plan, transport, self.name, torch.device(device), validate)

    def start(self, held_chunks: Mapping[int, torch.Tensor]) -> Handle[dict[int, torch.Tensor]]:
        """Issue the reduce-scatter; ``wait()`` returns ``{chunk: sum of its copies}`` for owned chunks.
        Sums run in a fixed order (own copy, then copies by source rank), in fp32 for bf16/fp16 chunks."""
        owned = {chunk: held_chunks.get(chunk) for chunk in self.owned}
        return self._exchange.start(held_chunks, self.held).then(lambda received: _sum_copies(owned, received))

    def __call__(self, held_chunks: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.start(held_chunks).wait()


def _sum_copies(owned: dict[int, torch.Tensor], received: Received) -> dict[int, torch.Tensor]:
    sums = {c: t.to(_ACCUMULATE_IN.get(t.dtype, t.dtype), copy=True) for c, t in owned.items()}
    for _, chunk, copy in received.copies:
        sums[chunk].add_(copy)
    received.release()
    return {c: total.to(owned[c].dtype) for c, total in sums.items()}
