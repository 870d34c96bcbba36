"""Running an ExchangePlan: check local chunks, then one batch of point-to-point operations.

Each chunk travels as its own message, straight from the caller's tensor (no packing copy), into a slice of
one pooled receive buffer laid out source by source in plan order; received chunks are typed views of it.
Messages between two ranks match in the order they are issued, which both sides take from the plan.
Measured against packing everything into one variable-split all-to-all, this was faster on both gloo and
MPI here (docs/BENCHMARKS.md): the packing copy cost more than the extra messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hecate.collectives.agreement import raise_unless_all_agree
from hecate.collectives.buffers import BufferPool
from hecate.collectives.errors import CollectiveError
from hecate.collectives.handle import Handle
from hecate.collectives.plan import ChunkSpec, ExchangePlan
from hecate.collectives.transport import PeerOp, Transport


def local_problem(
    local: Mapping[int, torch.Tensor], expected: tuple[int, ...], specs: tuple[ChunkSpec, ...], device: torch.device
) -> str | None:
    """What is wrong with this rank's chunks (in words), or None."""
    if sorted(local) != list(expected):
        return f"the placement puts chunks {list(expected)} here, but got chunks {sorted(local)}"
    for chunk in expected:
        tensor, spec = local[chunk], specs[chunk]
        if ChunkSpec.of(tensor) != spec:
            return f"chunk {chunk} is {ChunkSpec.of(tensor).describe()} but its spec says {spec.describe()}"
        if tensor.device != device:
            return f"chunk {chunk} is on {tensor.device}, the collective runs on {device}"
    return None


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _typed(raw: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """View bytes as the chunk; a copy only when the bytes do not start on an element boundary."""
    if raw.storage_offset() % spec.dtype.itemsize:
        raw = raw.clone()
    return raw.view(spec.dtype).view(spec.shape)


@dataclass
class Received:
    """Chunks that arrived, as ``(src, chunk, tensor)`` in source-rank order; tensors view one receive buffer."""

    copies: list[tuple[int, int, torch.Tensor]]
    buffer: torch.Tensor
    pool: BufferPool

    def release(self) -> None:
        """Give the receive buffer back for reuse; the tensors in ``copies`` must not be used afterwards."""
        self.pool.give(self.buffer)
        self.copies = []


class ChunkExchange:
    """One plan on one transport, with a pool of receive buffers (returned through ``Received.release``)."""

    def __init__(self, plan: ExchangePlan, transport: Transport, name: str, device: torch.device, validate: bool):
        if plan.world_size != transport.world_size:
            raise CollectiveError(
                f"{name}: the placements are over {plan.world_size} devices but the transport has "
                f"{transport.world_size} ranks"
            )
        self.plan = plan
        self.transport = transport
        self.name = name
        self.device = device
        self.validate = validate
        self.recv_pool = BufferPool(device)
        self.incoming = self._incoming(transport.rank)
        self.recv_nbytes = sum(spec.nbytes for _, _, spec, _ in self.incoming)

    def _incoming(self, rank: int) -> list[tuple[int, int, ChunkSpec, int]]:
        """``(src, chunk, spec, offset in the receive buffer)`` for every chunk this rank receives."""
        incoming, offset = [], 0
        for src in range(self.plan.world_size):
            for chunk in self.plan.routes[src][rank]:
                incoming.append((src, chunk, self.plan.specs[chunk], offset))
                offset += self.plan.specs[chunk].nbytes
        return incoming

    def start(self, local: Mapping[int, torch.Tensor], expected: tuple[int, ...]) -> Handle[Received]:
        """Check ``local`` (which must hold exactly the chunks ``expected``) on every rank, then send.
        The local tensors must stay unchanged until the handle's ``wait()``: they are sent from in place."""
        problem = local_problem(local, expected, self.plan.specs, self.device)
        if self.validate:
            raise_unless_all_agree(self.transport, self.name, problem, self.plan.fingerprint, self.device)
        elif problem is not None:
            raise CollectiveError(f"{self.name}: {problem}")
        recv = self.recv_pool.take(self.recv_nbytes)
        ops = [
            PeerOp("recv", recv[offset : offset + spec.nbytes], src)
            for src, _, spec, offset in self.incoming
            if spec.nbytes
        ]
        for dst, chunks in enumerate(self.plan.routes[self.transport.rank]):
            ops += [PeerOp("send", _as_bytes(local[c]), dst) for c in chunks if self.plan.specs[c].nbytes]
        return self.transport.batch_p2p(ops, name=self.name).then(lambda _: self._received(recv))

    def _received(self, recv: torch.Tensor) -> Received:
        copies = [
            (src, chunk, _typed(recv[offset : offset + spec.nbytes], spec))
            for src, chunk, spec, offset in self.incoming
        ]
        return Received(copies, recv, self.recv_pool)
