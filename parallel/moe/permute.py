"""Permute and unpermute: the local halves of dispatch and combine.

``sort_by_expert`` orders the kept (token, k) pairs by expert (stable, so token-major within an expert);
``permute`` gathers the tokens into that order, and ``unpermute`` puts the expert outputs back in their
(token, k) slots and sums them weighted by the router weights. Each expert's rows are then one contiguous slice,
so expert compute is one matmul per expert, never a loop over tokens. The combine gathers every pair into its
own slot and sums over K in a fixed order: deterministic, with no atomics.

Every row movement is a gather (``index_select``, forward; its backward is one ``index_add_``): on this CPU a
gather of 8,192 x 256 fp32 rows took ~1.3 ms, where ``x[idx]`` took ~4.7 (its backward, an accumulating
``index_put_``, ~4) and the scatter ``index_copy`` ~12. A scatter by a permutation is therefore done as a gather
by its inverse (:func:`inverse_permutation`). The weighted sum over K stays a broadcast multiply and a sum: a
``bmm`` ([1, K] x [K, D] per token) was ~40% faster, but CPU ``bmm``'s backward loops over tokens when the
gradient is broadcast (loss = out.sum()), and FLOP counters would count it as a matrix product.

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


def reordered(perm: Permutation, index_N: torch.Tensor) -> Permutation:
    """The same pairs with row i taken from row ``index_N[i]`` (e.g. grouped by destination rank); ``counts_E``
    still counts pairs per expert, though the rows are no longer expert-contiguous."""
    return Permutation(perm.pair_N[index_N], perm.token_N[index_N], perm.counts_E, perm.tokens, perm.top_k)


def inverse_permutation(order_N: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """inverse[order_N[i]] = i. With ``size`` > N (a partial permutation), positions no row lands on get N."""
    rows = order_N.numel()
    inverse = order_N.new_full((rows if size is None else size,), rows)
    inverse[order_N] = torch.arange(rows, device=order_N.device)
    return inverse


def permute(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x_ND: the token of each kept pair, in the permutation's row order."""
    return x_TD.index_select(0, perm.token_N)


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """out_TD = sum over k of weights_TK * (expert output of pair (t, k), zero if it was dropped).
    Accumulates in the promoted dtype of (y, weights): fp32 under bf16 autocast, since the weights are fp32."""
    pairs = perm.tokens * perm.top_k
    if perm.pair_N.numel() < pairs:  # dropped pairs read a zero row appended at N
        y_ND = torch.cat([y_ND, y_ND.new_zeros(1, y_ND.shape[-1])])
    y_TKD = y_ND.index_select(0, inverse_permutation(perm.pair_N, pairs)).view(perm.tokens, perm.top_k, -1)
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)
