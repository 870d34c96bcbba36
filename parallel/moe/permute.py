"""Permute and unpermute: the local halves of dispatch and combine.

``sort_by_expert`` orders the kept (token, k) pairs by expert (stable, so token-major within an expert);
``permute`` gathers the tokens into that order, and ``unpermute`` puts the expert outputs back in their
(token, k) slots and sums them weighted by the router weights. Each expert's rows are then one contiguous slice,
so expert compute is one matmul per expert, never a loop over tokens. The combine writes every pair into its own
slot and sums over K in a fixed order: deterministic, with no atomics.

Shapes: T tokens, D model dim, E experts, K experts per token, P = T * K pairs in token-major order,
N kept pairs sorted by expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Where each expert-sorted row came from."""

    pair_N: torch.Tensor  # long, index of the pair in token-major order (token * K + k)
    token_N: torch.Tensor  # long, its token
    counts_E: torch.Tensor  # long, kept pairs per expert (sums to N)
    tokens: int  # T
    top_k: int  # K


def sort_by_expert(experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> Permutation:
    """Sort the kept pairs by expert. Dropped pairs are given the id ``num_experts``, which sorts them to the end,
    where they are cut off."""
    tokens, top_k = experts_TK.shape
    experts_P = experts_TK.flatten()
    if keep_TK is not None:
        experts_P = torch.where(keep_TK.flatten(), experts_P, num_experts)
    order_P = torch.argsort(experts_P, stable=True)
    counts_E = torch.bincount(experts_P, minlength=num_experts + 1)[:num_experts]
    pair_N = order_P[: int(counts_E.sum())]
    return Permutation(pair_N, pair_N // top_k, counts_E, tokens, top_k)


def permute(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x_ND: the token of each kept pair, in expert order."""
    return x_TD[perm.token_N]


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """out_TD = sum over k of weights_TK * (expert output of pair (t, k), zero if it was dropped).
    Accumulates in the promoted dtype of (y, weights): fp32 under bf16 autocast, since the weights are fp32."""
    y_PD = y_ND.new_zeros(perm.tokens * perm.top_k, y_ND.shape[-1]).index_copy(0, perm.pair_N, y_ND)
    y_TKD = y_PD.view(perm.tokens, perm.top_k, -1)
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)
