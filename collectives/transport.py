"""The transport protocol: the few primitives every collective in Hecate is built from.

Every operation is issued asynchronously and returns a :class:`Handle`; ``.wait()`` blocks and returns the
result (the output tensor, or ``None``). ``name`` is the accounting key, so a collective built on a primitive
(``sparse_all_gather`` on ``all_to_all``) is counted under its own name. All-to-all splits are counts of
dim-0 rows, as in ``torch.distributed.all_to_all_single``; reductions sum unless told otherwise.
Tensors must be contiguous; ``all_gather`` / ``reduce_scatter`` concatenate ranks' parts along dim 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from hecate.collectives.accounting import CommStats
from hecate.collectives.errors import CollectiveError
from hecate.collectives.handle import Handle

Reduction = Literal["sum", "max", "min"]


@dataclass(frozen=True)
class PeerOp:
    """One send or receive of a batch of point-to-point operations; ``peer`` is a rank of the transport.
    Messages between two ranks match in issue order: the n-th send to a peer is its n-th receive from us."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int


class Transport(Protocol):
    rank: int
    world_size: int
    stats: CommStats

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: Sequence[int],
        input_splits: Sequence[int],
        *,
        name: str = "all_to_all",
    ) -> Handle[torch.Tensor]: ...

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "all_gather"
    ) -> Handle[torch.Tensor]: ...

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "reduce_scatter"
    ) -> Handle[torch.Tensor]: ...

    def all_reduce(
        self, tensor: torch.Tensor, *, reduce: Reduction = "sum", name: str = "all_reduce"
    ) -> Handle[torch.Tensor]: ...

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]: ...

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]: ...

    def barrier(self, *, name: str = "barrier") -> Handle[None]: ...


def check_all_to_all(
    output: torch.Tensor,
    input: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    world_size: int,
) -> None:
    """Same argument rules on every transport, with messages that say what is wrong."""
    for label, splits, tensor in (("input", input_splits, input), ("output", output_splits, output)):
        if len(splits) != world_size:
            raise CollectiveError(f"all_to_all: {label}_splits has {len(splits)} entries for {world_size} ranks")
        if any(s < 0 for s in splits) or sum(splits) != tensor.shape[0]:
            raise CollectiveError(
                f"all_to_all: {label}_splits {list(splits)} must be >= 0 and sum to the {label}'s "
                f"{tensor.shape[0]} rows"
            )
    if input.shape[1:] != output.shape[1:] or input.dtype != output.dtype:
        raise CollectiveError(
            f"all_to_all: input rows {tuple(input.shape[1:])} {input.dtype} and output rows "
            f"{tuple(output.shape[1:])} {output.dtype} differ"
        )


def check_rank(rank: int, world_size: int, role: str) -> None:
    """``role`` names the argument ("peer", "broadcast source") in the message."""
    if not 0 <= rank < world_size:
        raise CollectiveError(f"{role} {rank} is not a rank of this {world_size}-rank transport")


def copy_to_self(ops: Sequence[PeerOp], rank: int) -> None:
    """Deliver a batch's messages from ``rank`` to itself by copying, n-th send to n-th receive."""
    sends = [op.tensor for op in ops if op.kind == "send" and op.peer == rank]
    recvs = [op.tensor for op in ops if op.kind == "recv" and op.peer == rank]
    if [(s.shape, s.dtype) for s in sends] != [(r.shape, r.dtype) for r in recvs]:
        raise CollectiveError(
            f"rank {rank} sends {[(tuple(s.shape), s.dtype) for s in sends]} to itself but receives "
            f"{[(tuple(r.shape), r.dtype) for r in recvs]}"
        )
    for send, recv in zip(sends, recvs):
        recv.copy_(send)
