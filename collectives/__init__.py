"""Transports and the sparse collectives: how bytes move. Knows nothing about experts.

- ``Transport`` (protocol) with ``TorchTransport`` (default), ``MpiTransport`` and ``CupyNcclTransport``;
  every operation returns a ``Handle`` and is counted in the transport's ``CommStats``.
- ``all_to_all_autograd`` / ``all_reduce_autograd``: token dispatch / combine and router statistics, with
  the matching exchange in backward.
- ``OwnerPlacement`` / ``MaterializedPlacement`` and ``SparseAllGather`` / ``SparseReduceScatter``.

The MPI and cupy transports import their libraries only when constructed.
"""

from hecate.collectives.accounting import CommStats, OpStats, delta
from hecate.collectives.autograd import all_reduce_autograd, all_to_all_autograd
from hecate.collectives.cupy_transport import CupyNcclTransport
from hecate.collectives.factory import TRANSPORT_KINDS, transport_from_mesh
from hecate.collectives.handle import Handle
from hecate.collectives.mpi_transport import MpiTransport
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.collectives.plan import ChunkSpec, ExchangePlan, gather_plan, reduce_scatter_plan
from hecate.collectives.sparse import SparseAllGather, SparseReduceScatter
from hecate.collectives.torch_transport import TorchTransport
from hecate.collectives.transport import PeerOp, Transport

__all__ = [
    "ChunkSpec",
    "CommStats",
    "CupyNcclTransport",
    "ExchangePlan",
    "Handle",
    "MaterializedPlacement",
    "MpiTransport",
    "OpStats",
    "OwnerPlacement",
    "PeerOp",
    "SparseAllGather",
    "SparseReduceScatter",
    "TRANSPORT_KINDS",
    "TorchTransport",
    "Transport",
    "all_reduce_autograd",
    "all_to_all_autograd",
    "delta",
    "gather_plan",
    "reduce_scatter_plan",
    "transport_from_mesh",
]
