"""The dispatcher: the seam where expert parallelism plugs in.

The MoE layer runs route -> dispatch -> expert compute -> combine, in three calls so that an exchange can travel
while something else computes:

    start(tokens)       dispatch: sort the (token, expert) pairs by expert; an expert-parallel dispatcher also
                        issues the all-to-all that takes the rows to the ranks holding their experts
    compute(flight)     the experts on the rows that arrived; an expert-parallel dispatcher issues the exchange
                        back (and, with overlap chunks, pipelines the two exchanges with the experts)
    end(flight)         combine: the expert outputs back in token order, mixed with the router weights

Between ``start`` and ``compute`` the layer's caller may run other work (another sub-batch's attention,
``moe.overlap_sub_batches``); between ``compute`` and ``end``, other sub-batches' experts and the shared expert.
On one device ``start`` is a permutation and ``end`` its inverse. The layer does not change with the dispatcher.

Shapes: T tokens, D model dim, E experts (E_local under EP), K experts per token, N rows for the local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hecate.parallel.moe.experts import ExpertWeights
from hecate.parallel.moe.permute import Permutation, permute, sort_by_expert, unpermute


class ExpertsModule(Protocol):
    """The layer's experts (``Experts``, FSSDP's ``ShardedExperts``, ``ExpertTensorParallel``): held experts
    first, first + 1, ... on ``counts_H`` rows each; several calls in one forward share one ``unbound()``."""

    def __call__(
        self, x_MD: torch.Tensor, counts_H: torch.Tensor, first: int = 0, weights: ExpertWeights | None = None
    ) -> torch.Tensor: ...

    def unbound(self) -> ExpertWeights: ...


class Dispatcher(Protocol):
    def start(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, weights_TK: torch.Tensor
    ) -> Any:
        """Dispatch (issued, not waited): -> a flight for ``compute`` and ``end``."""
        ...

    def compute(self, flight: Any, experts: ExpertsModule, weights: ExpertWeights) -> None:
        """Run the experts on the flight's rows and issue their way back."""
        ...

    def end(self, flight: Any) -> torch.Tensor:
        """-> out_TD: expert outputs weighted and summed per token; dropped pairs contribute zero."""
        ...


@dataclass
class LocalFlight:
    """One dispatch on one device, from ``start`` to ``end``."""

    perm: Permutation
    x_ND: torch.Tensor  # rows sorted by expert
    weights_TK: torch.Tensor
    y_ND: torch.Tensor | None = None  # the experts' outputs, after compute


class LocalDispatcher:
    """Every expert lives here: dispatch is a permutation, combine its inverse; no exchange."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def start(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None, weights_TK: torch.Tensor
    ) -> LocalFlight:
        perm = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        return LocalFlight(perm, permute(x_TD, perm), weights_TK)

    def compute(self, flight: LocalFlight, experts: ExpertsModule, weights: ExpertWeights) -> None:
        flight.y_ND = experts(flight.x_ND, flight.perm.counts_E, 0, weights)

    def end(self, flight: LocalFlight) -> torch.Tensor:
        return unpermute(flight.y_ND, flight.weights_TK, flight.perm)
