"""Router losses, computed from sums so that data parallelism reproduces the single-process values exactly.

Each rank reduces its own tokens to a few sums (:class:`RouterSums`); a ``reduce`` hook combines them over the
group that shares one micro-batch (identity on one device, an all-reduce under DP), and the losses are formed
from the combined sums:

- aux loss (Switch/GShard): E * sum_e f_e * P_e, with f_e = pairs routed to e before dropping / (T * K) and
  P_e = mean over tokens of the per-token probability of e (``Routing.probs_TE``).
- z-loss (ST-MoE): mean over tokens of logsumexp(logits_t)^2.

Both are returned unscaled; the trainer multiplies them by ``aux_loss_coef`` and ``z_loss_coef``.

A DP reduce must keep autograd through ``prob_sum_E`` and ``lse_sq_sum`` (e.g. ``torch.distributed.nn``'s
all_reduce, whose backward all-reduces the gradient: with the usual gradient averaging over ranks this yields
exactly the single-process gradient of the global loss). ``counts_E`` needs no gradient. The hook also fills
in ``offset_E``: the pairs each expert received on earlier ranks (an exclusive prefix sum of counts over the
group), which capacity dropping needs to drop the same pairs as one process would.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hecate.parallel.moe.router import Routing


@dataclass
class RouterSums:
    """What the router losses and capacity dropping need from the tokens of one rank (or, reduced, all)."""

    counts_E: torch.Tensor  # long, (token, k) pairs routed to each expert before dropping
    prob_sum_E: torch.Tensor  # fp32, sum over tokens of probs_TE; differentiable
    lse_sq_sum: torch.Tensor  # fp32 scalar, sum over tokens of logsumexp(logits)^2; differentiable
    tokens: int  # number of tokens T
    offset_E: torch.Tensor  # long, pairs of each expert placed by earlier ranks (zeros before a reduce)


Reduce = Callable[[RouterSums], RouterSums]


def router_sums(routing: Routing, num_experts: int) -> RouterSums:
    """The local sums of one forward's routing."""
    counts_E = torch.bincount(routing.experts_TK.flatten(), minlength=num_experts)
    return RouterSums(
        counts_E=counts_E,
        prob_sum_E=routing.probs_TE.sum(dim=0),
        lse_sq_sum=torch.logsumexp(routing.logits_TE, dim=-1).square().sum(),
        tokens=routing.logits_TE.shape[0],
        offset_E=torch.zeros_like(counts_E),
    )


def local_reduce(sums: RouterSums) -> RouterSums:
    """The reduce of a group of one: the local sums are the global sums, and no rank comes earlier."""
    return sums


def add_sums(parts: list[RouterSums]) -> RouterSums:
    """The sums of a batch from those of its sub-batches (dropless: ``offset_E`` is not needed)."""
    if len(parts) == 1:
        return parts[0]
    return RouterSums(
        counts_E=sum(p.counts_E for p in parts),
        prob_sum_E=sum(p.prob_sum_E for p in parts),
        lse_sq_sum=sum(p.lse_sq_sum for p in parts),
        tokens=sum(p.tokens for p in parts),
        offset_E=torch.zeros_like(parts[0].counts_E),
    )


def aux_loss(sums: RouterSums, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss from (reduced) sums; 1.0 at perfect balance, E at full collapse."""
    fraction_E = sums.counts_E.float() / (sums.tokens * top_k)
    mean_prob_E = sums.prob_sum_E / sums.tokens
    return sums.counts_E.numel() * (fraction_E * mean_prob_E).sum()


def z_loss(sums: RouterSums) -> torch.Tensor:
    """Router z-loss from (reduced) sums: keeps the logits small so that the softmax stays well-conditioned."""
    return sums.lse_sq_sum / sums.tokens
