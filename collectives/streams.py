"""The communication stream: where asynchronous exchanges run, ordered against compute by events, written once with
PyTorch's device-generic API (``torch.Stream``, ``torch.Event`` through ``Stream.record_event``,
``torch.accelerator``) so that every accelerator and the CPU run the same code.

An exchange is issued on the side stream after the compute stream's queued work (:meth:`CommStream.issue`), and
its consumer's stream waits for it when its handle is waited on (:meth:`CommStream.hand_back`). The buffers it
touches are held by the handle until then, so the caching allocator cannot give their memory to other work while
the side stream still reads or writes them. On the CPU work runs in issue order: there is no side stream and the
events are not needed (the CPU backend has none), so issue and hand-back only keep the buffers alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class CommStream:
    """The side stream of one device (none on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.Stream(device=device) if device.type != "cpu" else None

    @classmethod
    def for_device_type(cls, device_type: str) -> CommStream:
        """The side stream of this process's current device of ``device_type`` ('cpu', 'cuda', ...)."""
        if device_type == "cpu":
            return cls(torch.device("cpu"))
        return cls(torch.device(device_type, torch.accelerator.current_device_index()))

    def _compute(self) -> torch.Stream:
        return torch.accelerator.current_stream(self.device)

    @contextlib.contextmanager
    def issue(self) -> Iterator[None]:
        """Enqueue an exchange inside this block: it starts after the work queued so far on the compute stream."""
        if self.side is None:
            yield
            return
        self.side.wait_event(self._compute().record_event())
        with self.side:
            yield

    @contextlib.contextmanager
    def hand_back(self) -> Iterator[None]:
        """Wait for an exchange inside this block (its waits then land on the side stream); afterwards the compute
        stream's later work waits for everything queued on the side stream."""
        if self.side is None:
            yield
            return
        with self.side:
            yield
        self._compute().wait_event(self.side.record_event())
