"""Capacity-factor dropping: each expert keeps at most ``capacity`` (token, k) pairs of a micro-batch.

Rule: flatten the pairs token-major (t0k0, t0k1, t1k0, ...); for expert e keep the pairs whose position among
e's pairs, plus ``offset_E[e]``, is below ``capacity = ceil(capacity_factor * T * K / E)``, T being the number
of tokens of the whole micro-batch. Under data parallelism ``offset_E`` counts the pairs of e on earlier ranks,
so every rank drops exactly the pairs that one process holding the whole micro-batch would drop. A dropped pair
contributes nothing to the output: its token keeps only its residual (and its other experts).

Shapes: T tokens, E experts, K experts per token, P = T * K pairs in token-major order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int | None:
    """Pairs one expert may keep; None when dropless (capacity_factor == 0).
    The factor is taken as the decimal it is written as, so that 1.1 * 100 tokens is 110, not 110.00000000000001."""
    if capacity_factor == 0:
        return None
    return math.ceil(Fraction(str(capacity_factor)) * tokens * top_k / num_experts)


def keep_within_capacity(experts_TK: torch.Tensor, capacity: int, offset_E: torch.Tensor) -> torch.Tensor:
    """keep_TK (bool): True where the pair fits in its expert's capacity under the token-major rule."""
    experts_P = experts_TK.flatten()
    order_P = torch.argsort(experts_P, stable=True)  # stable: token-major within each expert
    counts_E = torch.bincount(experts_P, minlength=offset_E.numel())
    starts_E = counts_E.cumsum(0) - counts_E
    position_P = torch.empty_like(experts_P)
    position_P[order_P] = torch.arange(experts_P.numel(), device=experts_P.device) - starts_E[experts_P[order_P]]
    return (position_P + offset_E[experts_P] < capacity).view_as(experts_TK)


def dropped_pairs(counts_E: torch.Tensor, capacity: int | None) -> int:
    """Pairs dropped from (global) counts: whatever exceeds each expert's capacity."""
    if capacity is None:
        return 0
    return int((counts_E - capacity).clamp(min=0).sum())
