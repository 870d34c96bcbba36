"""Variable-split all-to-all that autograd can see through: token dispatch and combine in MoE layers.

Backward is the reverse exchange: the gradient of what rank r received from rank s goes back to s.
Works over any transport.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hecate.collectives.transport import Transport


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...],
                transport: Transport, name: str) -> torch.Tensor:
        ctx.splits, ctx.transport, ctx.name = (send_splits, recv_splits), transport, name
        return _exchange(input, send_splits, recv_splits, transport, name)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        grad_input = _exchange(grad_output, recv_splits, send_splits, ctx.transport, f"{ctx.name}.backward")
        return grad_input, None, None, None, None


def _exchange(input: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...],
              transport: Transport, name: str) -> torch.Tensor:
    output = input.new_empty((sum(recv_splits), *input.shape[1:]))
    transport.all_to_all(output, input.contiguous(), recv_splits, send_splits, name=name).wait()
    return output


def all_to_all_autograd(input: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                        transport: Transport, *, name: str = "all_to_all") -> torch.Tensor:
    """Send ``send_splits[p]`` consecutive rows of ``input`` to rank p; receive ``recv_splits[p]`` rows from it."""
    return _AllToAll.apply(input, tuple(send_splits), tuple(recv_splits), transport, name)
