"""The cupy NCCL transport (GPU only): an NCCL communicator built from a unique id shared through the job's store.

It exists for GPU jobs that want NCCL without a torch NCCL process group (e.g. beside a gloo group).
Variable all-to-all and batched point-to-point are grouped NCCL send/recv. Operations run on a side stream
that first waits for the caller's current stream; ``wait()`` blocks the host until they are done.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hecate.collectives import traffic
from hecate.collectives.accounting import CommStats
from hecate.collectives.errors import TransportUnavailable
from hecate.collectives.handle import Handle
from hecate.collectives.transport import PeerOp, Reduction, check_all_to_all, check_rank

NCCL_BFLOAT16 = 9  # ncclBfloat16 in nccl.h (NCCL >= 2.10); older cupy builds do not name it
UNIQUE_ID_KEY = "hecate/cupy_nccl/unique_id"


def load_cupy_nccl():
    """``(cupy, cupy.cuda.nccl)``, or one error naming the first missing piece: cupy, a GPU, or NCCL."""
    try:
        import cupy
    except ImportError as e:
        raise TransportUnavailable(
            f"the cupy NCCL transport needs cupy, which is not installed (pip install cupy-cuda12x): {e}"
        ) from e
    try:
        gpu = cupy.is_available()
    except Exception as e:  # a broken driver install raises instead of answering False
        raise TransportUnavailable(f"the cupy NCCL transport needs a CUDA GPU; cupy cannot use one: {e}") from e
    if not gpu:
        raise TransportUnavailable(
            "the cupy NCCL transport needs a CUDA GPU; cupy is installed but sees no usable GPU or driver"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cupy only warns when libnccl is missing; we raise below
        from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        raise TransportUnavailable(
            "the cupy NCCL transport needs NCCL; cupy and a GPU are present but libnccl is not available "
            '(pip install "nvidia-nccl-cu12")'
        )
    return cupy, nccl


class CupyNcclTransport:
    """NCCL through cupy on CUDA tensors of one device. All ranks must call the constructor (it rendezvous)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        device: int | None = None,
        stats: CommStats | None = None,
        key: str = UNIQUE_ID_KEY,
    ):
        self.cupy, self.nccl = load_cupy_nccl()
        self.rank = rank
        self.world_size = world_size
        self.stats = stats if stats is not None else CommStats()
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        if rank == 0:
            store.set(key, pickle.dumps(self.nccl.get_unique_id()))
        unique_id = pickle.loads(store.get(key))
        with self.cupy.cuda.Device(self.device.index):
            self.comm = self.nccl.NcclCommunicator(world_size, unique_id, rank)
        self.stream = torch.cuda.Stream(self.device)
        nccl = self.nccl
        self._dtypes = {
            torch.uint8: nccl.NCCL_UINT8,
            torch.int32: nccl.NCCL_INT32,
            torch.int64: nccl.NCCL_INT64,
            torch.float16: nccl.NCCL_FLOAT16,
            torch.float32: nccl.NCCL_FLOAT32,
            torch.float64: nccl.NCCL_FLOAT64,
            torch.bfloat16: getattr(nccl, "NCCL_BFLOAT16", NCCL_BFLOAT16),
        }
        self._reduce_ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, dim: int | str = 0, stats: CommStats | None = None) -> CupyNcclTransport:
        """A NCCL communicator over the same ranks as one dimension of ``mesh``; its unique id travels through the
        job's torch.distributed store under a key of its own (one per group)."""
        load_cupy_nccl()  # the clear error without a GPU comes before touching the store
        ranks = dist.get_process_group_ranks(mesh.get_group(dim))
        store = dist.distributed_c10d._get_default_store()
        return cls(
            store, ranks.index(dist.get_rank()), len(ranks), stats=stats, key=f"{UNIQUE_ID_KEY}/{dim}/{min(ranks)}"
        )

    def _issue(self, name: str, tensors: Sequence[torch.Tensor], enqueue, result=None) -> Handle:
        """Run ``enqueue(stream_ptr)`` on the side stream after the caller's pending work on ``tensors``."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in tensors:
            t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            enqueue(self.stream.cuda_stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Handle(done.synchronize, lambda: result, partial(self.stats.record_wait, name))

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
        unit = traffic.row_bytes(input)

        def enqueue(stream: int) -> None:
            self.nccl.groupStart()
            send_at, recv_at = input.data_ptr(), output.data_ptr()
            for peer in range(self.world_size):
                if input_splits[peer]:
                    self.comm.send(send_at, input_splits[peer] * unit, self.nccl.NCCL_UINT8, peer, stream)
                if output_splits[peer]:
                    self.comm.recv(recv_at, output_splits[peer] * unit, self.nccl.NCCL_UINT8, peer, stream)
                send_at += input_splits[peer] * unit
                recv_at += output_splits[peer] * unit
            self.nccl.groupEnd()

        return self._issue(name, [output, input], enqueue, output)

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "all_gather"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.all_gather(input, self.world_size))

        def enqueue(stream: int) -> None:
            self.comm.allGather(input.data_ptr(), output.data_ptr(), input.nbytes, self.nccl.NCCL_UINT8, stream)

        return self._issue(name, [output, input], enqueue, output)

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "reduce_scatter"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.reduce_scatter(output, input, self.world_size))

        def enqueue(stream: int) -> None:
            self.comm.reduceScatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                self._dtypes[output.dtype],
                self.nccl.NCCL_SUM,
                stream,
            )

        return self._issue(name, [output, input], enqueue, output)

    def all_reduce(
        self, tensor: torch.Tensor, *, reduce: Reduction = "sum", name: str = "all_reduce"
    ) -> Handle[torch.Tensor]:
        self.stats.record(name, *traffic.all_reduce(tensor, self.world_size))

        def enqueue(stream: int) -> None:
            self.comm.allReduce(
                tensor.data_ptr(),
                tensor.data_ptr(),
                tensor.numel(),
                self._dtypes[tensor.dtype],
                self._reduce_ops[reduce],
                stream,
            )

        return self._issue(name, [tensor], enqueue, tensor)

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]:
        check_rank(src, self.world_size, "broadcast source")
        self.stats.record(name, *traffic.broadcast(tensor, src, self.rank, self.world_size))

        def enqueue(stream: int) -> None:
            self.comm.bcast(tensor.data_ptr(), tensor.nbytes, self.nccl.NCCL_UINT8, src, stream)

        return self._issue(name, [tensor], enqueue, tensor)

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]:
        for op in ops:
            check_rank(op.peer, self.world_size, "peer")
        self.stats.record(name, *traffic.point_to_point(ops, self.rank))

        def enqueue(stream: int) -> None:
            self.nccl.groupStart()
            for op in ops:
                move = self.comm.send if op.kind == "send" else self.comm.recv
                move(op.tensor.data_ptr(), op.tensor.nbytes, self.nccl.NCCL_UINT8, op.peer, stream)
            self.nccl.groupEnd()

        return self._issue(name, [op.tensor for op in ops], enqueue)

    def barrier(self, *, name: str = "barrier") -> Handle[None]:
        self.stats.record(name, 0, 0)
        token = torch.zeros(1, device=self.device)

        def enqueue(stream: int) -> None:
            self.comm.allReduce(
                token.data_ptr(), token.data_ptr(), 1, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM, stream
            )

        return self._issue(name, [token], enqueue)
