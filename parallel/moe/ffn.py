"""The feed-forward block that every expert, the shared expert and the dense blocks compute.

One function holds the math (:func:`ffn`) so that a dense FFN and an expert can never drift apart.
``ffn_dim`` is the hidden size for both activations: SwiGLU has a third matrix (gate), so 1.5x the parameters.

Shapes: N rows (tokens or token-expert pairs), D model dim, F hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ffn(
    x_ND: torch.Tensor, w1_DF: torch.Tensor, w2_FD: torch.Tensor, w3_DF: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """gelu: gelu(x w1) w2 (exact erf GELU). swiglu: (silu(x w1) * x w3) w2, w3 being the gate's partner."""
    h_NF = x_ND @ w1_DF
    if activation == "swiglu":
        h_NF = F.silu(h_NF) * (x_ND @ w3_DF)
    else:
        h_NF = F.gelu(h_NF)
    return h_NF @ w2_FD


def init_ffn_weights(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None, init_std: float, out_init_std: float | None
) -> None:
    """Normal(0, init_std) for the input matrices; the output matrix may get a smaller std (e.g. GPT-2's
    init_std / sqrt(2 * n_layers)) so that the residual stream's variance does not grow with depth."""
    with torch.no_grad():
        nn.init.normal_(w1, std=init_std)
        nn.init.normal_(w2, std=init_std if out_init_std is None else out_init_std)
        if w3 is not None:
            nn.init.normal_(w3, std=init_std)


class FeedForward(nn.Module):
    """A dense FFN: the FFN of non-MoE blocks and the MoE layer's shared expert. x_...D -> y_...D."""

    def __init__(
        self, dim: int, hidden: int, activation: str, init_std: float = 0.02, out_init_std: float | None = None
    ):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(dim, hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, dim))
        self.w3 = nn.Parameter(torch.empty(dim, hidden)) if activation == "swiglu" else None
        init_ffn_weights(self.w1, self.w2, self.w3, init_std, out_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.w1, self.w2, self.w3, self.activation)
