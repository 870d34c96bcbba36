"""The mpi4py transport: MPI non-blocking collectives on host buffers.

CPU tensors are handed to MPI as zero-copy numpy byte views. CUDA tensors go to MPI directly when the library
is CUDA-aware (detected with ``MPIX_Query_cuda_support``), else they are staged through host copies.
Reductions of dtypes MPI has no type for (bf16, fp16) run on a float32 copy. Note that Open MPI progresses
non-blocking collectives only inside MPI calls, so overlap with computation is limited to what it buffers.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hecate.collectives import traffic
from hecate.collectives.accounting import CommStats
from hecate.collectives.errors import CollectiveError, TransportUnavailable
from hecate.collectives.handle import Handle
from hecate.collectives.transport import PeerOp, Reduction, check_all_to_all, check_rank

P2P_TAG = 7301  # one tag for all batched point-to-point messages; MPI keeps same-pair messages in order
_MPI_TYPED = {torch.float32, torch.float64, torch.int32, torch.int64}
_REDUCE_AS = {True: torch.float32, False: torch.int64}  # by is_floating_point: what other dtypes reduce in


def load_mpi():
    """The ``mpi4py.MPI`` module, or one clear error saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise TransportUnavailable(
            "the MPI transport needs mpi4py and an MPI library: apt-get install openmpi-bin libopenmpi-dev; "
            f"pip install mpi4py ({e})"
        ) from e
    return MPI


def is_cuda_aware(MPI) -> bool:
    """True when the MPI library accepts CUDA device buffers (Open MPI's MPIX_Query_cuda_support)."""
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    try:
        return bool(ctypes.CDLL("libmpi.so.40").MPIX_Query_cuda_support())
    except (OSError, AttributeError):
        return False


class _Buffers:
    """How one operation's tensors look to MPI, and the copies back into staged tensors once it completes."""

    def __init__(self, cuda_aware: bool):
        self.cuda_aware = cuda_aware
        self.copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.alive: list = []  # MPI reads and writes these until the requests complete; mpi4py does not hold them

    def raw(self, t: torch.Tensor, output: bool = False):
        """A byte buffer over ``t`` for data movement (any dtype)."""
        return self._expose(t, output, as_bytes=True)

    def typed(self, t: torch.Tensor, output: bool = False):
        """A buffer MPI can reduce: native dtypes as they are, others through a float32 / int64 copy."""
        return self._expose(t, output, as_bytes=False)

    def _expose(self, t: torch.Tensor, output: bool, as_bytes: bool):
        if not t.is_contiguous():
            raise CollectiveError(f"the MPI transport needs contiguous tensors, got strides {t.stride()}")
        t = t.detach()
        dtype = t.dtype if as_bytes or t.dtype in _MPI_TYPED else _REDUCE_AS[t.is_floating_point()]
        if dtype == t.dtype and (not t.is_cuda or self.cuda_aware):
            if t.is_cuda:
                torch.cuda.current_stream(t.device).synchronize()
            target = t
        else:
            target = t.to("cpu", dtype)
            if output:
                self.copy_back.append((t, target))
        flat = target.reshape(-1).view(torch.uint8) if as_bytes else target.reshape(-1)
        exposed = flat if flat.is_cuda else flat.numpy()
        self.alive += [t, target, exposed]
        return exposed

    def finish(self) -> None:
        for target, staged in self.copy_back:
            target.copy_(staged)


class MpiTransport:
    """Wraps one mpi4py communicator (COMM_WORLD unless given)."""

    def __init__(self, comm=None, stats: CommStats | None = None, cuda_aware: bool | None = None):
        self.MPI = load_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.stats = stats if stats is not None else CommStats()
        self.cuda_aware = is_cuda_aware(self.MPI) if cuda_aware is None else cuda_aware
        self._reduce_ops = {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, dim: int | str = 0, stats: CommStats | None = None) -> MpiTransport:
        """An MPI communicator over the same ranks as one dimension of ``mesh``. Every rank of the job must call
        this in the same order (``MPI_Comm_split`` is collective over COMM_WORLD), and MPI's ranks must be
        torch.distributed's, which holds when ``mpirun`` started the workers."""
        MPI = load_mpi()
        world = MPI.COMM_WORLD
        if (world.Get_rank(), world.Get_size()) != (dist.get_rank(), dist.get_world_size()):
            raise TransportUnavailable(
                f"collectives.transport=mpi needs workers started by mpirun (hecate train --launcher mpi, or "
                f"mpirun -np N python -m hecate.launch.worker): MPI sees rank {world.Get_rank()} of "
                f"{world.Get_size()}, torch.distributed rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        ranks = dist.get_process_group_ranks(mesh.get_group(dim))
        comm = world.Split(color=min(ranks), key=ranks.index(dist.get_rank()))
        return cls(comm, stats)

    def _handle(self, name: str, requests: list, buffers: _Buffers, result=None) -> Handle:
        def finish():
            buffers.finish()
            return result

        return Handle(partial(self.MPI.Request.Waitall, requests), finish, partial(self.stats.record_wait, name))

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
        buffers = _Buffers(self.cuda_aware)
        send = [buffers.raw(input), _counts_displs(input_splits, traffic.row_bytes(input)), self.MPI.BYTE]
        recv = [
            buffers.raw(output, output=True),
            _counts_displs(output_splits, traffic.row_bytes(output)),
            self.MPI.BYTE,
        ]
        return self._handle(name, [self.comm.Ialltoallv(send, recv)], buffers, output)

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "all_gather"
    ) -> Handle[torch.Tensor]:
        _check_parts("all_gather", output, input, self.world_size)
        self.stats.record(name, *traffic.all_gather(input, self.world_size))
        buffers = _Buffers(self.cuda_aware)
        request = self.comm.Iallgather(
            [buffers.raw(input), self.MPI.BYTE], [buffers.raw(output, output=True), self.MPI.BYTE]
        )
        return self._handle(name, [request], buffers, output)

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "reduce_scatter"
    ) -> Handle[torch.Tensor]:
        _check_parts("reduce_scatter", input, output, self.world_size)
        self.stats.record(name, *traffic.reduce_scatter(output, input, self.world_size))
        buffers = _Buffers(self.cuda_aware)
        request = self.comm.Ireduce_scatter_block(
            buffers.typed(input), buffers.typed(output, output=True), self.MPI.SUM
        )
        return self._handle(name, [request], buffers, output)

    def all_reduce(
        self, tensor: torch.Tensor, *, reduce: Reduction = "sum", name: str = "all_reduce"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.all_reduce(tensor, self.world_size))
        buffers = _Buffers(self.cuda_aware)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buffers.typed(tensor, output=True), self._reduce_ops[reduce])
        return self._handle(name, [request], buffers, tensor)

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]:
        check_rank(src, self.world_size, "broadcast source")
        self.stats.record(name, *traffic.broadcast(tensor, src, self.rank, self.world_size))
        buffers = _Buffers(self.cuda_aware)
        buffer = buffers.raw(tensor, output=self.rank != src)
        return self._handle(name, [self.comm.Ibcast([buffer, self.MPI.BYTE], root=src)], buffers, tensor)

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]:
        for op in ops:
            check_rank(op.peer, self.world_size, "peer")
        self.stats.record(name, *traffic.point_to_point(ops, self.rank))
        buffers = _Buffers(self.cuda_aware)
        requests = [
            self.comm.Isend([buffers.raw(op.tensor), self.MPI.BYTE], dest=op.peer, tag=P2P_TAG)
            if op.kind == "send"
            else self.comm.Irecv([buffers.raw(op.tensor, output=True), self.MPI.BYTE], source=op.peer, tag=P2P_TAG)
            for op in ops
        ]
        return self._handle(name, requests, buffers)

    def barrier(self, *, name: str = "barrier") -> Handle[None]:
        self.stats.record(name, 0, 0)
        return self._handle(name, [self.comm.Ibarrier()], _Buffers(self.cuda_aware))


def _counts_displs(splits: Sequence[int], unit: int) -> tuple[list[int], list[int]]:
    counts = [s * unit for s in splits]
    return counts, np.cumsum([0] + counts[:-1]).tolist()


def _check_parts(op: str, whole: torch.Tensor, part: torch.Tensor, world_size: int) -> None:
    if whole.nbytes != part.nbytes * world_size:
        raise CollectiveError(
            f"{op}: the full tensor ({tuple(whole.shape)}) must hold {world_size} x the per-rank part "
            f"({tuple(part.shape)})"
        )
