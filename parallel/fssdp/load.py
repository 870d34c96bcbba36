"""Per-expert load estimate for the FSSDP planner: the mean token count of each expert over a sliding window.

The planner runs before the router of the same step, so it can only use the past: the last ``window`` steps'
global counts (already summed over the group, hence identical on every rank, so every rank plans the same).
Before the first update every expert is assumed equally loaded (1.0 each).

Shapes: E experts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from hecate.collectives.errors import ConfigError
from hecate.parallel.errors import CheckpointError, LayoutError


def as_loads(values_E: torch.Tensor | Sequence[float], num_experts: int, what: str) -> list[float]:
    """Per-expert values as a list of finite, non-negative floats; ``what`` names them in the error."""
    if isinstance(values_E, torch.Tensor):
        flat_E = values_E.detach().to("cpu", torch.float64).flatten().tolist()
    else:
        flat_E = [float(v) for v in values_E]
    if len(flat_E) != num_experts:
        raise LayoutError(f"{what}: expected one value per expert ({num_experts}), got {len(flat_E)}")
    bad = [e for e, v in enumerate(flat_E) if not (v >= 0 and v != float("inf"))]  # also catches NaN
    if bad:
        raise LayoutError(f"{what}: values must be finite and >= 0; experts {bad} have {[flat_E[e] for e in bad]}")
    return flat_E


class LoadEstimator:
    """Sliding-window mean of per-expert token counts (one estimator per MoE layer)."""

    def __init__(self, num_experts: int, window: int = 5):
        if num_experts < 1:
            raise ConfigError("moe.num_experts", f"must be >= 1, got {num_experts}")
        if window < 1:
            raise ConfigError("fssdp.window", f"must be >= 1 (steps averaged by the load estimator), got {window}")
        self.num_experts = num_experts
        self.window = window
        self._history: deque[list[float]] = deque(maxlen=window)

    @property
    def num_updates(self) -> int:
        """Steps currently in the window (0 before the first update, at most ``window``)."""
        return len(self._history)

    def update(self, counts_E: torch.Tensor | Sequence[float]) -> None:
        """Record one step's global per-expert token counts."""
        self._history.append(as_loads(counts_E, self.num_experts, "load estimator update"))

    def estimate(self) -> list[float]:
        """Mean count of each expert over the steps in the window; uniform 1.0 before any update."""
        if not self._history:
            return [1.0] * self.num_experts
        steps = len(self._history)
        return [sum(step_E[e] for step_E in self._history) / steps for e in range(self.num_experts)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "window": self.window,
            "history": [list(step_E) for step_E in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the window. A checkpoint saved with another window keeps its most recent steps that fit."""
        if state.get("num_experts") != self.num_experts:
            raise CheckpointError(
                f"load estimator state is for {state.get('num_experts')} experts, this layer has {self.num_experts}"
            )
        history = [as_loads(step_E, self.num_experts, "load estimator checkpoint") for step_E in state["history"]]
        self._history = deque(history[-self.window :], maxlen=self.window)
