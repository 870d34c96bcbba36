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


def experts_forward(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                    w3_EDF: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y_ND: row n goes through the expert whose slice holds it. Experts with no rows still run an empty matmul,
    so every expert's weights get a (zero) gradient. ``counts_E`` is read on the host (one sync)."""
    slices = x_ND.split(counts_E.tolist())
    w3s = w3_EDF.unbind(0) if w3_EDF is not None else [None] * len(slices)
    # unbind (not w[e]): its backward stacks the E gradients once instead of E full-size scatters
    ys = [ffn(x, w1, w2, w3, activation) for x, w1, w2, w3 in zip(slices, w1_EDF.unbind(0), w2_EFD.unbind(0), w3s)]
    return torch.cat(ys)


class Experts(nn.Module):
    """Holds the E experts' weights, stacked [E, ...]; the math is :func:`experts_forward`."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if activation == "swiglu" else None
        init_ffn_weights(self.w1, self.w2, self.w3, init_std, out_init_std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return experts_forward(x_ND, counts_E, self.w1, self.w2, self.w3, self.activation)
