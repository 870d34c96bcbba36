"""Reusable byte buffers for hot paths: filling fresh memory costs several times more than reusing a buffer."""

from __future__ import annotations

import torch

KEEP_FREE = 2  # free buffers kept per pool: enough for a collective issued again while its last result lives


def _whole_storage(tensor: torch.Tensor) -> torch.Tensor:
    """All bytes of the memory behind ``tensor`` (any dtype, shape or view) as one flat uint8 tensor."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)


class BufferPool:
    """Hands out uint8 buffers of at least the asked size; a buffer is back in the pool once given back.

    Buffers are told apart by their memory, never by value (tensors compare element-wise)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of ``nbytes`` or more (slice ``[:nbytes]``); the smallest free one that fits, else new."""
        fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fitting:
            return self._free.pop(min(fitting, key=lambda i: (self._free[i].numel(), i)))
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give(self, tensor: torch.Tensor) -> None:
        """Take back the memory behind ``tensor`` (whole storage, whatever its dtype and shape), which must not be
        used afterwards. Memory already in the pool is not added twice; beyond ``KEEP_FREE`` the smallest goes."""
        buffer = _whole_storage(tensor)
        if buffer.numel() == 0 or any(b.data_ptr() == buffer.data_ptr() for b in self._free):
            return
        self._free.append(buffer)
        if len(self._free) > KEEP_FREE:
            self._free.pop(min(range(len(self._free)), key=lambda i: (self._free[i].numel(), i)))
