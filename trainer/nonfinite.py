"""Where a non-finite value first appeared, so that a stopped or skipped step names the layer, not only the loss.

Forward hooks note the first module, in execution order, whose output holds a NaN or an infinity (a module's hook
runs after its children's, so the innermost one is named: ``blocks.1.attn.proj`` rather than ``blocks.1``).
A gradient that goes non-finite while the forward stayed finite is named by its parameter, the first one in
backward order. The check costs one ``isfinite().all()`` per module output and is skipped in evaluation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NonFiniteTracer:
    """Forward hooks on every submodule of ``model``; :attr:`first` is the first one with a non-finite output since
    :meth:`reset`."""

    def __init__(self, model: nn.Module):
        self.first: str | None = None
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(self._hook(name))

    def reset(self) -> None:
        self.first = None

    def _hook(self, name: str):
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.first is None and module.training and has_nonfinite(output):
                self.first = name
        return hook


def has_nonfinite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(has_nonfinite(v) for v in value)
    return False


def first_nonfinite_gradient(model: nn.Module) -> str | None:
    """The parameter whose gradient is non-finite, first in backward order (the last such one in forward order)."""
    for name, param in reversed(list(model.named_parameters())):
        if param.grad is not None and has_nonfinite(param.grad):
            return name
    return None
