"""Reusable byte buffers for hot paths: filling fresh memory costs several times more than reusing a buffer."""
from __future__ import annotations

import torch

KEEP_FREE = 2  # free buffers kept per pool: enough for a collective issued again while its last result lives


class BufferPool:
    """Hands out uint8 buffers of at least the asked size; a buffer is back in the pool once given back."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of ``nbytes`` or more (slice ``[:nbytes]``); the smallest free one that fits, else new."""
        fitting = [b for b in self._free if b.numel() >= nbytes]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self._free.remove(buffer)
            return buffer
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)
        if len(self._free) > KEEP_FREE:
            self._free.remove(min(self._free, key=torch.Tensor.numel))
