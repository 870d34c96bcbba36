"""The default transport: a torch.distributed process group (gloo on CPU, NCCL on GPU). Every operation is issued
on the device's communication stream (:mod:`hecate.collectives.streams`) and holds its buffers until waited on."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hecate.collectives import traffic
from hecate.collectives.accounting import CommStats
from hecate.collectives.handle import Handle
from hecate.collectives.streams import CommStream
from hecate.collectives.transport import PeerOp, Reduction, check_all_to_all, check_rank, copy_to_self

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchTransport:
    """Wraps one ProcessGroup. Uneven all-to-all uses ``all_to_all_single`` with splits, the form gloo has;
    point-to-point messages to oneself (which gloo cannot send) are local copies."""

    def __init__(
        self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None, device_type: str = "cpu"
    ):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.stats = stats if stats is not None else CommStats()
        self.stream = CommStream.for_device_type(device_type)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, dim: int | str = 0, stats: CommStats | None = None) -> TorchTransport:
        return cls(mesh.get_group(dim), stats, mesh.device_type)

    def _handle(self, name: str, works: Sequence[dist.Work | None], result=None, buffers=()) -> Handle:
        """``buffers`` (the operation's tensors) stay referenced until the wait has handed them back."""

        def block() -> None:
            with self.stream.hand_back():
                for work in works:
                    if work is not None:
                        work.wait()
            buffers_held.clear()

        buffers_held = list(buffers)
        return Handle(block, lambda: result, partial(self.stats.record_wait, name))

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: Sequence[int],
        input_splits: Sequence[int],
        *,
        name: str = "all_to_all",
    ) -> Handle[torch.Tensor]:
        check_all_to_all(output, input, output_splits, input_splits, self.world_size)
        self.stats.record(name, *traffic.all_to_all(output, input, output_splits, input_splits, self.rank))
        with self.stream.issue():
            work = dist.all_to_all_single(
                output, input, list(output_splits), list(input_splits), group=self.group, async_op=True
            )
        return self._handle(name, [work], output, (output, input))

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "all_gather"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.all_gather(input, self.world_size))
        with self.stream.issue():
            work = dist.all_gather_single(output, input, group=self.group, async_op=True)
        return self._handle(name, [work], output, (output, input))

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "reduce_scatter"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.reduce_scatter(output, input, self.world_size))
        with self.stream.issue():
            work = dist.reduce_scatter_single(output, input, group=self.group, async_op=True)
        return self._handle(name, [work], output, (output, input))

    def all_reduce(
        self, tensor: torch.Tensor, *, reduce: Reduction = "sum", name: str = "all_reduce"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.all_reduce(tensor, self.world_size))
        with self.stream.issue():
            work = dist.all_reduce(tensor, _REDUCE_OPS[reduce], group=self.group, async_op=True)
        return self._handle(name, [work], tensor, (tensor,))

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]:
        check_rank(src, self.world_size, "broadcast source")
        self.stats.record(name, *traffic.broadcast(tensor, src, self.rank, self.world_size))
        with self.stream.issue():
            work = dist.broadcast(tensor, group_src=src, group=self.group, async_op=True)
        return self._handle(name, [work], tensor, (tensor,))

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]:
        for op in ops:
            check_rank(op.peer, self.world_size, "peer")
        self.stats.record(name, *traffic.point_to_point(ops, self.rank))
        copy_to_self(ops, self.rank)
        p2p = [
            dist.P2POp(dist.isend if op.kind == "send" else dist.irecv, op.tensor, group=self.group, group_peer=op.peer)
            for op in ops
            if op.peer != self.rank
        ]
        with self.stream.issue():
            works = dist.batch_isend_irecv(p2p) if p2p else []
        return self._handle(name, works, buffers=[op.tensor for op in ops])

    def barrier(self, *, name: str = "barrier") -> Handle[None]:
        self.stats.record(name, 0, 0)
        with self.stream.issue():
            work = dist.barrier(group=self.group, async_op=True)
        return self._handle(name, [work])
