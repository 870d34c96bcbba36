"""A process-group backend that carries device tensors over gloo through host memory: the exchange path of the
single-GPU simulated mode (``hecate train --simulate N`` with more ranks than GPUs).

NCCL refuses two ranks of one communicator on one GPU, and gloo takes CUDA tensors for a few collectives only. This
backend wraps one gloo group: every operation copies its device tensors to host memory, runs gloo's operation on
the copies and copies the results back; host tensors pass through untouched. It is registered with
torch.distributed under :data:`HOST_STAGED`, so everything that speaks torch.distributed - Hecate's transports,
DeviceMesh, DTensor, the pipeline schedules - runs on it unchanged, and the normal CPU and GPU paths are untouched.
Collectives complete before they return (every rank issues them in the same order); point-to-point receives
complete when waited on, so that a batch of sends and receives cannot deadlock. It moves every byte twice over
PCIe and once through loopback TCP: a way to run N ranks on one GPU, not a fast one (unmeasured).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

HOST_STAGED = "hecate_host_staged"
STAGE_ALL_ENV = "HECATE_STAGE_HOST_TENSORS"  # "1": copy host tensors too (tests the copies on a machine without GPU)


class _Staging:
    """Host copies of one operation's device tensors; :meth:`finish` writes the outputs back."""

    def __init__(self, stage_all: bool = False):
        self.stage_all = stage_all
        self.back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def host(self, t: torch.Tensor, output: bool = False) -> torch.Tensor:
        if t.device.type == "cpu" and not self.stage_all:
            return t
        copy = t.detach().to("cpu", copy=True)
        if output:
            self.back.append((t, copy))
        return copy

    def hosts(self, tensors, output: bool = False) -> list:
        return [self.hosts(t, output) if isinstance(t, list) else self.host(t, output) for t in tensors]

    @torch.no_grad()  # a pipeline's receive buffers are leaves that require grad
    def finish(self) -> None:
        for device_tensor, copy in self.back:
            device_tensor.copy_(copy)


class _ReceiveWork(dist.Work):
    """A receive in flight: waiting for it also copies the message onto the device."""

    def __init__(self, inner: dist.Work, staging: _Staging):
        super().__init__()
        self.inner, self.staging = inner, staging

    def wait(self, timeout=None) -> bool:
        self.inner.wait()
        self.staging.finish()
        return True

    def is_completed(self) -> bool:
        return self.inner.is_completed()


def _done(result) -> dist.Work:
    future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


class HostStagedGroup(dist.ProcessGroup):
    """One gloo group behind device-tensor staging (see the module docstring)."""

    def __init__(self, gloo: dist.ProcessGroup, rank: int, size: int, name: str, stage_all: bool = False):
        super().__init__(rank, size)
        self.gloo, self._name, self.stage_all = gloo, name, stage_all

    def getBackendName(self) -> str:
        return HOST_STAGED

    def _staging(self) -> _Staging:
        return _Staging(self.stage_all)

    def getGroupName(self) -> str:
        return self._name

    def setGroupName(self, name: str) -> None:
        self._name = name

    def _collective(self, method: str, outputs, inputs, *args, result=None) -> dist.Work:
        """gloo's ``method`` on host copies (outputs first in its arguments when ``outputs`` is not None)."""
        staging = self._staging()
        host_out = staging.hosts(outputs, output=True) if isinstance(outputs, list) else None
        if outputs is not None and not isinstance(outputs, list):
            host_out = staging.host(outputs, output=True)
        host_in = staging.hosts(inputs) if isinstance(inputs, list) else staging.host(inputs)
        call_args = (host_in, *args) if outputs is None else (host_out, host_in, *args)
        getattr(self.gloo, method)(*call_args).wait()
        staging.finish()
        return _done(result)

    def _in_place(self, method: str, tensors: list, *args) -> dist.Work:
        staging = self._staging()
        getattr(self.gloo, method)(staging.hosts(tensors, output=True), *args).wait()
        staging.finish()
        return _done(tensors)

    def allreduce(self, tensors, opts):
        return self._in_place("allreduce", tensors, opts)

    def allreduce_coalesced(self, tensors, opts):
        return self._in_place("allreduce_coalesced", tensors, opts)

    def broadcast(self, tensors, opts):
        return self._in_place("broadcast", tensors, opts)

    def allgather(self, output_lists, inputs, opts):
        return self._collective("allgather", output_lists, inputs, opts, result=output_lists)

    def all_gather_single(self, output, input, opts):
        return self._collective("_allgather_base", output, input, opts, result=[output])

    def reduce_scatter(self, outputs, input_lists, opts):
        return self._collective("reduce_scatter", outputs, input_lists, opts, result=outputs)

    def reduce_scatter_single(self, output, input, opts):
        return self._collective("_reduce_scatter_base", output, input, opts, result=[output])

    def all_to_all_single(self, output, input, output_splits, input_splits, opts):
        return self._collective("alltoall_base", output, input, output_splits, input_splits, opts, result=[output])

    def alltoall(self, outputs, inputs, opts):
        return self._collective("alltoall", outputs, inputs, opts, result=outputs)

    def gather(self, output_lists, inputs, opts):
        return self._collective("gather", output_lists, inputs, opts, result=output_lists)

    def scatter(self, outputs, input_lists, opts):
        return self._collective("scatter", outputs, input_lists, opts, result=outputs)

    def barrier(self, opts):
        self.gloo.barrier(opts).wait()
        return _done(None)

    def send(self, tensors, dst, tag):
        return self.gloo.send(self._staging().hosts(tensors), dst, tag)

    def recv(self, tensors, src, tag):
        staging = self._staging()
        return _ReceiveWork(self.gloo.recv(staging.hosts(tensors, output=True), src, tag), staging)


def _create(options, _backend_options) -> HostStagedGroup:
    gloo = dist.ProcessGroupGloo(options.store, options.group_rank, options.group_size, options.timeout)
    stage_all = os.environ.get(STAGE_ALL_ENV) == "1"
    return HostStagedGroup(gloo, options.group_rank, options.group_size, options.group_id, stage_all)


if HOST_STAGED.upper() not in dist.Backend._plugins:
    dist.Backend.register_backend(HOST_STAGED, _create, extended_api=True, devices=["cpu", "cuda"])
