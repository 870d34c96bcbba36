"""Top-k routing: which experts each token goes to and with what weight.

Scoring (``score``):
- softmax: probs_TE = softmax(logits_TE); the k experts are chosen by the largest (probs + expert_bias);
  weights_TK = probs at the chosen experts, rescaled to sum to 1 per token when ``renormalize``.
- sigmoid (DeepSeek-V3): scores_TE = sigmoid(logits_TE); chosen by the largest (scores + expert_bias);
  weights_TK = the chosen scores, rescaled to sum to 1 when ``renormalize``. The load-balancing loss sees
  the scores normalised per token (scores / their sum over experts), so that they form a distribution.

The expert bias (aux-loss-free balancing) moves only the choice, never a weight: no gradient flows through it.
A token's k choices are ordered by descending selection score; "token-major order" of the (token, k) pairs is
t0k0, t0k1, ..., t1k0, ... - the order in which capacity dropping counts places.

Shapes: T tokens, D model dim, E experts, K experts per token (top_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """One forward's routing decision. Float tensors are fp32 and carry autograd."""

    experts_TK: torch.Tensor  # long, chosen experts, descending selection score
    weights_TK: torch.Tensor  # combine weights of the chosen experts
    probs_TE: torch.Tensor  # per-token distribution over experts that the aux loss averages
    logits_TE: torch.Tensor  # raw router logits (the z-loss reads them)


def route(
    logits_TE: torch.Tensor, top_k: int, score: str, renormalize: bool, expert_bias_E: torch.Tensor | None = None
) -> Routing:
    """Pure routing math on fp32 logits; see the module docstring for the definitions."""
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        probs_TE = scores_TE
    else:
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    select_TE = scores_TE.detach()
    if expert_bias_E is not None:
        select_TE = select_TE + expert_bias_E
    experts_TK = select_TE.topk(top_k, dim=-1, sorted=True).indices
    weights_TK = scores_TE.gather(-1, experts_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(experts_TK, weights_TK, probs_TE, logits_TE)


def bias_step(counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free update: rate * sign(mean load - load). Under-loaded experts go up."""
    counts_E = counts_E.float()
    return rate * torch.sign(counts_E.mean() - counts_E)


class Router(nn.Module):
    """Linear gate (no bias) plus the selection-only ``expert_bias`` buffer. x_TD -> Routing.

    The logits and everything after them are computed in fp32 with autocast off: top-k choices, the softmax
    and the z-loss are sensitive to bf16 rounding, and the gate is small (E x D)."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, score: str, renormalize: bool, bias_update_rate: float = 0.0
    ):
        super().__init__()
        self.top_k, self.score, self.renormalize = top_k, score, renormalize
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # Always registered (zeros when unused) so that checkpoints load whatever the update rate.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.gate.weight.float().t()
            return route(logits_TE, self.top_k, self.score, self.renormalize, self.expert_bias)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Move the selection bias towards balance, from one optimizer step's global counts (every rank
        must pass the same counts so that the bias stays identical). A no-op when the rate is 0."""
        if self.bias_update_rate > 0:
            self.expert_bias += bias_step(counts_E.to(self.expert_bias.device), self.bias_update_rate)
