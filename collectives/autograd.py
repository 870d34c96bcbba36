"""Collectives that autograd can see through, over any transport.

- ``all_to_all_autograd``: variable-split all-to-all for token dispatch and combine in MoE layers. Backward is
  the reverse exchange: the gradient of what rank r received from rank s goes back to s.
- ``all_reduce_autograd``: a sum whose backward sums the gradients over the same ranks (each rank's input
  reaches every rank's output), as data-parallel router statistics need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hecate.collectives.transport import Transport


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        send_splits: tuple[int, ...],
        recv_splits: tuple[int, ...],
        transport: Transport,
        name: str,
    ) -> torch.Tensor:
        ctx.splits, ctx.transport, ctx.name = (send_splits, recv_splits), transport, name
        return _exchange(input, send_splits, recv_splits, transport, name)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        grad_input = _exchange(grad_output, recv_splits, send_splits, ctx.transport, f"{ctx.name}.backward")
        return grad_input, None, None, None, None


def _exchange(
    input: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], transport: Transport, name: str
) -> torch.Tensor:
    output = input.new_empty((sum(recv_splits), *input.shape[1:]))
    transport.all_to_all(output, input.contiguous(), recv_splits, send_splits, name=name).wait()
    return output


def all_to_all_autograd(
    input: torch.Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    transport: Transport,
    *,
    name: str = "all_to_all",
) -> torch.Tensor:
    """Send ``send_splits[p]`` consecutive rows of ``input`` to rank p; receive ``recv_splits[p]`` rows from it."""
    return _AllToAll.apply(input, tuple(send_splits), tuple(recv_splits), transport, name)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, transport: Transport, name: str) -> torch.Tensor:
        ctx.transport, ctx.name = transport, name
        return transport.all_reduce(input.detach().clone().contiguous(), name=name).wait()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.transport.all_reduce(grad_output.clone().contiguous(), name=f"{ctx.name}.backward").wait()
        return grad, None, None


def all_reduce_autograd(input: torch.Tensor, transport: Transport, *, name: str = "all_reduce") -> torch.Tensor:
    """The sum of ``input`` over the transport's ranks; the input is not modified."""
    return _AllReduce.apply(input, transport, name)
