"""Compiling a sparse collective into an exchange plan: who sends which chunks to whom, and how many bytes.

Pure and cached: the same (owner, materialized, specs) gives the same plan on every rank without any
communication, so precondition errors are raised identically everywhere before data moves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from hecate.collectives.errors import CollectiveError
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement

PLAN_CACHE_SIZE = 256  # distinct (owner, materialized, specs) triples kept; one per layer and step pattern


@dataclass(frozen=True)
class ChunkSpec:
    """Shape and dtype of one chunk; every copy of the chunk on every device must match it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def flat(cls, numel: int, dtype: torch.dtype = torch.float32) -> ChunkSpec:
        return cls((numel,), dtype)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ChunkSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.shape} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class ExchangePlan:
    """``routes[src][dst]``: the chunks ``src`` sends to ``dst``, ascending; ``specs[c]`` sizes chunk ``c``."""

    routes: tuple[tuple[tuple[int, ...], ...], ...]
    specs: tuple[ChunkSpec, ...]

    @property
    def world_size(self) -> int:
        return len(self.routes)

    def bytes_between(self, src: int, dst: int) -> int:
        return sum(self.specs[c].nbytes for c in self.routes[src][dst])

    def send_bytes_P(self, rank: int) -> list[int]:
        return [self.bytes_between(rank, peer) for peer in range(self.world_size)]

    def recv_bytes_P(self, rank: int) -> list[int]:
        return [self.bytes_between(peer, rank) for peer in range(self.world_size)]

    @cached_property
    def total_bytes(self) -> int:
        return sum(self.bytes_between(s, d) for s in range(self.world_size) for d in range(self.world_size))

    def transposed(self) -> ExchangePlan:
        """The reverse exchange: what ``dst`` received from ``src`` goes back from ``dst`` to ``src``."""
        n = self.world_size
        return ExchangePlan(tuple(tuple(self.routes[d][s] for d in range(n)) for s in range(n)), self.specs)

    @cached_property
    def fingerprint(self) -> int:
        """A digest that is equal on two ranks exactly when their plans are; compared before data moves."""
        text = repr((self.routes, [(s.shape, str(s.dtype)) for s in self.specs]))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def normalize_specs(specs: ChunkSpec | Sequence[ChunkSpec], num_chunks: int) -> tuple[ChunkSpec, ...]:
    """One spec for every chunk, or one spec per chunk."""
    specs = (specs,) * num_chunks if isinstance(specs, ChunkSpec) else tuple(specs)
    if len(specs) != num_chunks:
        raise CollectiveError(f"got {len(specs)} chunk specs for {num_chunks} chunks")
    return specs


def check_placements(owner: OwnerPlacement, materialized: MaterializedPlacement) -> None:
    """The preconditions both sparse collectives share: same world and chunks, owner pairs inside P1."""
    if owner.world_size != materialized.world_size:
        raise CollectiveError(
            f"owner placement is over {owner.world_size} devices but the materialized one over "
            f"{materialized.world_size}"
        )
    if owner.num_chunks != materialized.num_chunks:
        raise CollectiveError(
            f"owner placement has {owner.num_chunks} chunks but the materialized one {materialized.num_chunks}"
        )
    missing = [(c, d) for c, d in enumerate(owner.owner_C) if d not in materialized.devices_C[c]]
    if missing:
        raise CollectiveError(
            f"the owner placement is not a subset of the materialized placement: (chunk, owner) pairs "
            f"{missing} are missing from it"
        )


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def gather_plan(
    owner: OwnerPlacement, materialized: MaterializedPlacement, specs: tuple[ChunkSpec, ...]
) -> ExchangePlan:
    """SparseAllGather(P0 -> P1): each owner sends its chunk to every other device P1 lists for it."""
    check_placements(owner, materialized)
    normalize_specs(specs, owner.num_chunks)
    n = owner.world_size
    routes = [[[] for _ in range(n)] for _ in range(n)]
    for chunk, devices in enumerate(materialized.devices_C):
        src = owner.owner_C[chunk]
        for dst in devices:
            if dst != src:
                routes[src][dst].append(chunk)
    return ExchangePlan(tuple(tuple(tuple(r) for r in row) for row in routes), specs)


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def reduce_scatter_plan(
    owner: OwnerPlacement, materialized: MaterializedPlacement, specs: tuple[ChunkSpec, ...]
) -> ExchangePlan:
    """SparseReduceScatter(P1 -> P0): every replica holder sends its copy back to the chunk's owner."""
    return gather_plan(owner, materialized, specs).transposed()
