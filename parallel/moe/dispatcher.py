"""The dispatcher: the seam where expert parallelism plugs in.

The MoE layer runs route -> dispatch -> expert compute -> combine. ``dispatch`` turns tokens and their routing
into rows sorted by (local) expert plus the row count of each local expert; ``combine`` takes the expert outputs
back to token order and mixes them with the router weights. On one device that is permute / unpermute.
An expert-parallel dispatcher keeps the same two methods and adds the exchanges in between:
permute -> all-to-all (uneven splits) -> sort by local expert | experts | unsort -> all-to-all back -> unpermute,
with its own handle type carrying the splits. The layer does not change.

Shapes: T tokens, D model dim, E experts (E_local under EP), K experts per token, N rows for the local experts.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from hecate.parallel.moe.permute import Permutation, permute, sort_by_expert, unpermute


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (x_ND sorted by local expert, counts_E of the local experts, handle for combine)."""
        ...

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, handle: Any) -> torch.Tensor:
        """-> out_TD: expert outputs weighted and summed per token; dropped pairs contribute zero."""
        ...

    def run(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """dispatch -> experts -> combine; a dispatcher that pipelines chunks (overlap) reorders these steps."""
        ...


def dispatch_compute_combine(dispatcher: Dispatcher, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                             keep_TK: torch.Tensor | None, weights_TK: torch.Tensor,
                             experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The three steps one after the other: every dispatcher's ``run`` without overlap."""
    x_ND, counts_E, handle = dispatcher.dispatch(x_TD, experts_TK, keep_TK)
    return dispatcher.combine(experts(x_ND, counts_E), weights_TK, handle)


class LocalDispatcher:
    """Every expert lives here: dispatch is a permutation, combine its inverse; no exchange."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Permutation]:
        perm = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        return permute(x_TD, perm), perm.counts_E, perm

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, handle: Permutation) -> torch.Tensor:
        return unpermute(y_ND, weights_TK, handle)

    def run(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return dispatch_compute_combine(self, x_TD, experts_TK, keep_TK, weights_TK, experts)
