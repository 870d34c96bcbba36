"""Placements: which devices hold which chunks (a chunk is one flat buffer, e.g. one expert's parameters).

An :class:`OwnerPlacement` maps every chunk to exactly one device (its owner). A :class:`MaterializedPlacement`
lists, per chunk, every device that holds a copy; the sparse collectives move data between the two.
Both are small, immutable and hashable: planners in ``parallel/`` build them identically on every rank,
and compiled plans are cached per (owner, materialized, specs). Construction validates ranks, so a bad
placement raises the same :class:`CollectiveError` on every rank before anything moves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hecate.collectives.errors import CollectiveError


def _check_world(world_size: int, kind: str) -> None:
    if world_size < 1:
        raise CollectiveError(f"{kind}: world_size must be at least 1, got {world_size}")


def _check_device(kind: str, chunk: int, device: int, world_size: int) -> None:
    if not 0 <= device < world_size:
        raise CollectiveError(
            f"{kind}: chunk {chunk} is placed on device {device}, outside the ranks 0..{world_size - 1}"
        )


def _devices_per_chunk(pairs: Iterable[tuple[int, int]], num_chunks: int, kind: str) -> list[set[int]]:
    devices_C: list[set[int]] = [set() for _ in range(num_chunks)]
    for chunk, device in pairs:
        if not 0 <= chunk < num_chunks:
            raise CollectiveError(f"{kind}: chunk {chunk} is outside the chunks 0..{num_chunks - 1}")
        devices_C[chunk].add(int(device))
    return devices_C


@dataclass(frozen=True)
class OwnerPlacement:
    """``owner_C[c]`` is the one device that owns chunk ``c`` (master copy, gradients to apply, optimizer state)."""

    owner_C: tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner_C", tuple(int(d) for d in self.owner_C))
        _check_world(self.world_size, "owner placement")
        for chunk, device in enumerate(self.owner_C):
            _check_device("owner placement", chunk, device, self.world_size)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]], num_chunks: int, world_size: int) -> OwnerPlacement:
        """From (chunk, device) pairs; it must be surjective onto the chunks and give each exactly one owner."""
        devices_C = _devices_per_chunk(pairs, num_chunks, "owner placement")
        orphans = [c for c, devices in enumerate(devices_C) if not devices]
        if orphans:
            raise CollectiveError(f"owner placement is not surjective: chunks {orphans} have no owner")
        shared = {c: sorted(devices) for c, devices in enumerate(devices_C) if len(devices) > 1}
        if shared:
            raise CollectiveError(f"owner placement gives chunks more than one owner: {shared}")
        return cls(tuple(min(devices) for devices in devices_C), world_size)

    @property
    def num_chunks(self) -> int:
        return len(self.owner_C)

    def chunks_on(self, device: int) -> tuple[int, ...]:
        return tuple(c for c, owner in enumerate(self.owner_C) if owner == device)


@dataclass(frozen=True)
class MaterializedPlacement:
    """``devices_C[c]``: every device holding a copy of chunk ``c`` (sorted), owners included."""

    devices_C: tuple[tuple[int, ...], ...]
    world_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices_C", tuple(tuple(sorted(set(map(int, ds)))) for ds in self.devices_C))
        _check_world(self.world_size, "materialized placement")
        for chunk, devices in enumerate(self.devices_C):
            for device in devices:
                _check_device("materialized placement", chunk, device, self.world_size)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]], num_chunks: int, world_size: int) -> MaterializedPlacement:
        return cls(
            tuple(tuple(ds) for ds in _devices_per_chunk(pairs, num_chunks, "materialized placement")), world_size
        )

    @classmethod
    def from_owner(cls, owner: OwnerPlacement, replicas: Iterable[tuple[int, int]] = ()) -> MaterializedPlacement:
        """The owner placement plus extra (chunk, device) replicas."""
        pairs = [*enumerate(owner.owner_C), *replicas]
        return cls.from_pairs(pairs, owner.num_chunks, owner.world_size)

    @property
    def num_chunks(self) -> int:
        return len(self.devices_C)

    def chunks_on(self, device: int) -> tuple[int, ...]:
        return tuple(c for c, devices in enumerate(self.devices_C) if device in devices)
