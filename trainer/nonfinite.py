"""Where a non-finite value first appeared, so that a stopped or skipped step names the layer, not only the loss.

Forward hooks note the first module, in execution order, whose output holds a NaN or an infinity (a module's hook
runs after its children's, so the innermost one is named: ``blocks.1.attn.proj`` rather than ``blocks.1``).
Gradient hooks note the first parameter, in backward order, whose gradient does (before gradient averaging and
clipping, which would spread it to every parameter). Each check is one sum per module output or gradient;
evaluation is not checked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NonFiniteTracer:
    """Hooks on every submodule and parameter of ``model``; :meth:`where` names the first non-finite value seen
    since :meth:`reset` (forward first, then backward)."""

    def __init__(self, model: nn.Module):
        self.first_output: str | None = None
        self.first_gradient: str | None = None
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(self._output_hook(name))
        for name, param in model.named_parameters():
            param.register_hook(self._gradient_hook(name))

    def reset(self) -> None:
        self.first_output = self.first_gradient = None

    def where(self) -> str | None:
        if self.first_output is not None:
            return self.first_output
        return f"the gradient of {self.first_gradient}" if self.first_gradient is not None else None

    def _output_hook(self, name: str):
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.first_output is None and module.training and has_nonfinite(output):
                self.first_output = name

        return hook

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            if self.first_gradient is None and has_nonfinite(grad):
                self.first_gradient = name

        return hook


def has_nonfinite(value: Any) -> bool:
    """One sum per tensor (no mask is allocated): NaN and inf propagate into it. A sum can also overflow with every
    entry finite; that could only name a module too early, and is read only in a step that already failed."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value.detach().sum()))
    if isinstance(value, (tuple, list)):
        return any(has_nonfinite(v) for v in value)
    return False
