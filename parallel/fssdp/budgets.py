"""The planner's budgets derived from measurements (``fssdp.overlap_budget: auto``, ``fssdp.memory_budget: auto``).

- overlap budget t: the expert copies that arrive on a device while the block's non-MoE part (attention) runs:
  floor(non-MoE seconds x gather bytes per second / one expert's bytes), clipped to [0, E].
- memory budget m: the replicas that fit in the memory set aside for them: floor(free bytes / what one replica
  costs), clipped to [0, E - E/D] (a device never needs a replica of an expert it owns). One replica costs its
  weights and its gradient buffer, once for every MoE layer whose replicas are alive at the same time.

Measurements are noisy and the first steps are slow (allocation, warm-up), so the engine feeds them to a
:class:`RecentMedian` and derives the budgets from its value. Every rank must use the same budgets (the plan is
computed everywhere): derive them from values all ranks agree on (e.g. after an all-reduce max of the timings).
"""

from __future__ import annotations

import math
from collections import deque
from statistics import median


def _check_measure(name: str, value: float, positive: bool = False) -> float:
    """A measured or configured quantity: finite, >= 0 (> 0 when it divides)."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def overlap_budget(non_moe_seconds: float, gather_bytes_per_s: float, expert_bytes: int, num_experts: int) -> int:
    """t = floor(non_moe_seconds x gather_bytes_per_s / expert_bytes), clipped to [0, num_experts]."""
    seconds = _check_measure("non-MoE time", non_moe_seconds)
    bandwidth = _check_measure("gather bandwidth", gather_bytes_per_s)
    size = _check_measure("expert bytes", expert_bytes, positive=True)
    return min(math.floor(seconds * bandwidth / size), num_experts)


def replica_bytes(expert_params: int, param_bytes: int, grad_bytes: int | None = None) -> int:
    """What one replica holds on a device: the expert's weights and its gradient buffer (same dtype unless
    ``grad_bytes`` says otherwise, e.g. fp32 gradients of bf16 weights)."""
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    return int(_check_measure("expert parameters", expert_params) * (param_bytes + grad_bytes))


def memory_budget(
    free_bytes: float, bytes_per_replica: int, num_experts: int, num_devices: int, layers_alive: int = 1
) -> int:
    """m = floor(free_bytes / (bytes_per_replica x layers_alive)), clipped to [0, E - E/D].

    ``free_bytes``: the device's free memory after a measured step, or a configured cap. ``layers_alive``: MoE
    layers whose replicas are held at once - all of them without re-materialization (forward keeps them for
    backward), two with it (the layer in backward and the one gathered ahead)."""
    free = _check_measure("free memory", free_bytes)
    per_slot = _check_measure("replica bytes", bytes_per_replica, positive=True) * max(int(layers_alive), 1)
    return min(math.floor(free / per_slot), num_experts - num_experts // num_devices)


class RecentMedian:
    """Median of the last ``window`` samples: robust to the odd slow step, follows a lasting change."""

    def __init__(self, window: int = 9):
        if window < 1:
            raise ValueError(f"window must be >= 1 sample, got {window}")
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, sample: float) -> None:
        self._samples.append(_check_measure("sample", sample))

    @property
    def count(self) -> int:
        """Samples currently held (at most ``window``)."""
        return len(self._samples)

    @property
    def value(self) -> float | None:
        """The median of the held samples; None before the first."""
        return median(self._samples) if self._samples else None
