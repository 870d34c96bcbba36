"""Logical bytes each collective moves between this rank and the others, shared by every transport.

Self-traffic (a rank's own split of an all-to-all, its own share of an all-gather) is not counted: it never
leaves the device. Reductions count each contribution that reaches another rank once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hecate.collectives.transport import PeerOp


def row_bytes(t: torch.Tensor) -> int:
    """Bytes in one dim-0 row: the unit in which all-to-all splits are given."""
    return t.element_size() * math.prod(t.shape[1:])


def all_to_all(
    output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], rank: int
) -> tuple[int, int]:
    sent = (sum(input_splits) - input_splits[rank]) * row_bytes(input)
    received = (sum(output_splits) - output_splits[rank]) * row_bytes(output)
    return sent, received


def all_gather(input: torch.Tensor, world_size: int) -> tuple[int, int]:
    return input.nbytes * (world_size - 1), input.nbytes * (world_size - 1)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, world_size: int) -> tuple[int, int]:
    return input.nbytes - output.nbytes, output.nbytes * (world_size - 1)


def all_reduce(tensor: torch.Tensor, world_size: int) -> tuple[int, int]:
    return tensor.nbytes * (world_size - 1), tensor.nbytes * (world_size - 1)


def broadcast(tensor: torch.Tensor, src: int, rank: int, world_size: int) -> tuple[int, int]:
    return (tensor.nbytes * (world_size - 1), 0) if rank == src else (0, tensor.nbytes)


def point_to_point(ops: Sequence[PeerOp], rank: int) -> tuple[int, int]:
    sent = sum(op.tensor.nbytes for op in ops if op.kind == "send" and op.peer != rank)
    return sent, sum(op.tensor.nbytes for op in ops if op.kind == "recv" and op.peer != rank)
