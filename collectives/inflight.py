"""A split-phase all-to-all that autograd can see through: issue now, wait later, in forward and in backward.

``all_to_all_start`` issues the exchange and returns an :class:`InFlight`; its ``wait()`` returns the received
rows. Whatever runs between the two overlaps the transfer. Backward mirrors it: the gradient's reverse exchange
is issued when backward reaches ``wait`` and waited when it reaches ``start``, so the autograd engine computes
whatever it reaches in between (e.g. another chunk's experts) while the gradient travels. Two autograd nodes
per exchange and nothing else; the schedule stays in the caller (``parallel/moe/ep_dispatcher.py``).

Concurrency per transport:
- gloo: ``async_op=True`` queues the work on the process group's own worker threads, so the transfer proceeds
  while this thread computes. Those threads are not torch's intra-op pool: keep ``torch.set_num_threads`` at
  (cores / ranks per machine, and no more than the cores of a rank bound to some) - what ``--simulate`` and the
  launchers set - so the compute threads leave the communication threads a core's share instead of preempting
  them (on 2 cores with 2 ranks: 1 thread each).
- NCCL (torch.distributed) and cupy-NCCL: the collective runs on the library's communication stream. A GPU
  caller must keep the stream/event discipline: the input is produced on the compute stream, so the
  communication stream waits on an event recorded there before it reads (torch's NCCL process group does this
  itself; the cupy transport records the event); ``wait()`` makes the *current stream* wait on the
  communication stream's completion event (it does not block the host), and the buffers stay referenced by the
  in-flight object until then so the caching allocator cannot hand their memory to another kernel
  (``record_stream`` on the communication stream is the alternative). Tensors on a GPU that the transport
  cannot reach raise the transport's error (``collectives/cupy_transport.py``), never a silent host copy.

Shapes: N rows sent, M rows received, D row width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hecate.collectives.handle import Handle
from hecate.collectives.transport import Transport


class _Exchange:
    """State shared by the two autograd nodes of one exchange (plain object: autograd never sees it)."""

    def __init__(self, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], transport: Transport, name: str):
        self.send_splits, self.recv_splits = send_splits, recv_splits
        self.transport, self.name = transport, name
        self.forward: Handle | None = None
        self.backward: Handle | None = None
        self.keep: torch.Tensor | None = None  # a send buffer that must live until its exchange completes
        self.grad_ND: torch.Tensor | None = None  # backward's receive buffer


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        ctx.ex = ex
        ex.keep = x_ND.contiguous()
        out_MD = x_ND.new_empty((sum(ex.recv_splits), *x_ND.shape[1:]))
        ex.forward = ex.transport.all_to_all(out_MD, ex.keep, ex.recv_splits, ex.send_splits, name=ex.name)
        return out_MD  # filled when the handle completes; only _Wait reads it

    @staticmethod
    def backward(ctx, _grad_MD: torch.Tensor):
        ex = ctx.ex  # _grad_MD is already on its way back: _Wait.backward sent it
        ex.backward.wait()
        grad_ND, ex.grad_ND, ex.keep, ex.backward = ex.grad_ND, None, None, None
        return grad_ND, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_MD: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        ctx.ex = ex
        ex.forward.wait()
        ex.keep = ex.forward = None
        return out_MD.view_as(out_MD)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        ex = ctx.ex
        ex.keep = grad_MD.contiguous()
        ex.grad_ND = grad_MD.new_empty((sum(ex.send_splits), *grad_MD.shape[1:]))
        ex.backward = ex.transport.all_to_all(
            ex.grad_ND, ex.keep, ex.send_splits, ex.recv_splits, name=f"{ex.name}.backward"
        )
        return ex.keep, None  # handed to _Start.backward, which waits for the reverse exchange


class InFlight:
    """An issued exchange; ``wait()`` once to get the received rows (differentiable)."""

    def __init__(self, out_MD: torch.Tensor, ex: _Exchange):
        self._out_MD, self._ex = out_MD, ex

    def wait(self) -> torch.Tensor:
        out_MD, self._out_MD = self._out_MD, None  # the caller holds the rows from here: keep no second reference
        return _Wait.apply(out_MD, self._ex)


def all_to_all_start(
    x_ND: torch.Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    transport: Transport,
    *,
    name: str = "all_to_all",
) -> InFlight:
    """Issue: send ``send_splits[p]`` consecutive rows of ``x_ND`` to rank p, receive ``recv_splits[p]`` from it.
    ``x_ND`` must not be modified until ``wait()``. Ranks must issue and wait their exchanges in the same order."""
    ex = _Exchange(tuple(send_splits), tuple(recv_splits), transport, name)
    return InFlight(_Start.apply(x_ND, ex), ex)
