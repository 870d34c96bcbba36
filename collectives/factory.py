"""One transport per mesh dimension, of the kind the run's config names (``collectives.transport``)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from hecate.collectives.accounting import CommStats
from hecate.collectives.cupy_transport import CupyNcclTransport
from hecate.collectives.mpi_transport import MpiTransport
from hecate.collectives.torch_transport import TorchTransport
from hecate.collectives.transport import Transport

TRANSPORT_KINDS = {"torch": TorchTransport, "mpi": MpiTransport, "cupy": CupyNcclTransport}


def transport_from_mesh(kind: str, mesh: DeviceMesh, dim: int | str, stats: CommStats | None = None) -> Transport:
    """The ``kind`` transport over the ranks of ``mesh``'s dimension ``dim``; all ranks call it in the same order."""
    if kind not in TRANSPORT_KINDS:
        raise ValueError(f"unknown transport {kind!r}; one of {sorted(TRANSPORT_KINDS)}")
    return TRANSPORT_KINDS[kind].from_mesh(mesh, dim, stats)
