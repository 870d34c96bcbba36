"""Expert computation as a pure function of (rows sorted by expert, rows per expert, the experts' weights).

The weights are arguments, not module state, so that FSSDP can pass weights it materialized from other devices
and EP can pass only its local experts'. The loop runs over experts (each slice is one matmul chain), never over
tokens. On this CPU one ``mm`` per expert beat ``torch._grouped_mm`` in fp32 (~150 vs ~105 GFLOP/s); a grouped
GEMM can replace the loop here without touching any caller.

Shapes: N rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from hecate.parallel.moe.ffn import ffn, init_ffn_weights


class ExpertWeights:
    """The held experts' weights as one tensor per expert, unbound once per forward. A forward that computes its
    experts in several calls (overlap chunks) uses each expert's weights where its rows are, and backward still
    stacks the experts' gradients once per weight; ``unbind`` (not ``w[e]``) because its backward is one stack,
    where E indexings would be E full-size scatters."""

    def __init__(self, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, w3_EDF: torch.Tensor | None, activation: str):
        self.w1, self.w2 = w1_EDF.unbind(0), w2_EFD.unbind(0)
        self.w3 = w3_EDF.unbind(0) if w3_EDF is not None else (None,) * len(self.w1)
        self.activation = activation

    def __call__(self, x_ND: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        """y_ND for experts first, first + 1, ... with ``counts`` rows each (x_ND sorted by expert). An expert
        with no rows still runs an empty matmul, so its weights get a (zero) gradient."""
        experts = range(first, first + len(counts))
        return torch.cat(
            [ffn(x, self.w1[e], self.w2[e], self.w3[e], self.activation) for x, e in zip(x_ND.split(counts), experts)]
        )


class Experts(nn.Module):
    """Holds the E experts' weights, stacked [E, ...]; the math is :class:`ExpertWeights`."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if activation == "swiglu" else None
        init_ffn_weights(self.w1, self.w2, self.w3, init_std, out_init_std)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, first: int = 0, weights: ExpertWeights | None = None
    ) -> torch.Tensor:
        """Experts first, first + 1, ... on ``counts_E`` rows each. A forward that calls this several times
        (overlap chunks) passes the ``weights`` of one :meth:`unbound`."""
        return (weights or self.unbound())(x_ND, counts_E.tolist(), first)

    def unbound(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, self.w3, self.activation)
