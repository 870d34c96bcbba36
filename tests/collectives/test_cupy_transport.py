"""The cupy NCCL transport: real operations where a GPU is present, otherwise the one clear error."""

import sys
import types

import pytest
import torch
import torch.distributed as dist
from collective_cases import check_primitives

from hecate.collectives import CupyNcclTransport
from hecate.collectives.cupy_transport import load_cupy_nccl
from hecate.collectives.errors import TransportUnavailable


def _gpu_ready() -> bool:
    try:
        load_cupy_nccl()
    except TransportUnavailable:
        return False
    return torch.cuda.is_available()


def test_cupy_transport_runs_on_a_gpu_or_names_what_is_missing():
    if _gpu_ready():
        transport = CupyNcclTransport(dist.HashStore(), rank=0, world_size=1)
        with torch.device("cuda"):
            assert check_primitives(transport) == {"ok": True}
        return
    with pytest.raises(TransportUnavailable) as caught:
        CupyNcclTransport(dist.HashStore(), rank=0, world_size=1)
    message = str(caught.value)
    assert message.startswith("the cupy NCCL transport needs ")
    assert any(what in message for what in ("cupy, which is not installed", "a CUDA GPU", "libnccl"))
    assert "\n" not in message


def _fake_cupy(monkeypatch, gpu: bool, nccl: bool) -> None:
    cupy = types.ModuleType("cupy")
    cupy.is_available = lambda: gpu
    cupy.cuda = types.ModuleType("cupy.cuda")
    cupy.cuda.nccl = types.ModuleType("cupy.cuda.nccl")
    cupy.cuda.nccl.available = nccl
    for name, module in (("cupy", cupy), ("cupy.cuda", cupy.cuda), ("cupy.cuda.nccl", cupy.cuda.nccl)):
        monkeypatch.setitem(sys.modules, name, module)


def test_missing_cupy_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(TransportUnavailable, match="needs cupy, which is not installed"):
        load_cupy_nccl()


def test_missing_gpu_is_named_before_nccl(monkeypatch):
    _fake_cupy(monkeypatch, gpu=False, nccl=False)
    with pytest.raises(TransportUnavailable, match="needs a CUDA GPU; cupy is installed but sees no usable GPU"):
        load_cupy_nccl()


def test_missing_nccl_is_named(monkeypatch):
    _fake_cupy(monkeypatch, gpu=True, nccl=False)
    with pytest.raises(TransportUnavailable, match="needs NCCL; cupy and a GPU are present but libnccl"):
        load_cupy_nccl()
