"""Expert tensor parallelism (ETP): every expert's FFN split over the ``etp`` ranks along its hidden size.

It wraps the expert computation and leaves the dispatcher alone: the expert-parallel all-to-all runs over the ep
group of this rank's etp index (ranks that hold the same F-shard of different experts), so after dispatch each
etp rank holds the rows that *its* ep peers sent for the local experts. The etp ranks then
1. exchange row counts and all-gather their rows (variable sizes, an all-to-all of the rows repeated per peer),
   and reorder them expert-major, so every etp rank sees every row of the local experts;
2. compute the partial FFN output with their F-shard (w1/w3 columns, w2 rows) - one matmul chain per expert;
3. send each peer the partial outputs of its rows and sum what comes back (the all-to-all's backward is the
   reverse exchange, and the repeat's backward sums the gradients of the gathered copies).
The sum over F-shards is added in a fixed order (etp rank 0 first), so runs are reproducible.

Shapes: N rows this rank received for its local experts (sorted by expert), M rows of all etp peers, D model dim,
F expert hidden dim, f = F / etp, E local experts, R etp ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from hecate.collectives import Transport, all_to_all_autograd
from hecate.parallel.moe.experts import ExpertWeights

WEIGHTS = ("w1", "w2", "w3")
HIDDEN_DIM = {"w1": 2, "w2": 1, "w3": 2}  # where F sits in each [E, ...] expert weight


class ExpertTensorParallel(nn.Module):
    """Replaces a layer's ``Experts`` (parameter names unchanged): the local experts' weights, F-shard of this
    etp rank."""

    def __init__(self, experts: nn.Module, etp: Transport):
        super().__init__()
        self.activation, self.etp = experts.activation, etp
        for name in WEIGHTS:
            full = getattr(experts, name)
            if full is None:
                setattr(self, name, None)
                continue
            dim, size = HIDDEN_DIM[name], full.shape[HIDDEN_DIM[name]] // etp.world_size
            setattr(self, name, nn.Parameter(full.detach().narrow(dim, etp.rank * size, size).clone()))

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, first: int = 0, weights: ExpertWeights | None = None
    ) -> torch.Tensor:
        """Local experts first, first + 1, ... on ``counts_E`` rows each (the ``Experts`` contract). The etp
        peers' calls must agree on the experts, but each peer's overlap chunks are cut where its own rows fall:
        so every call computes all local experts, those outside the run on zero rows."""
        experts = self.w1.shape[0]
        counts_E = torch.nn.functional.pad(counts_E, (first, experts - first - counts_E.numel()))
        return self._compute(x_ND, counts_E, weights or self.unbound())

    def unbound(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, self.w3, self.activation)

    def _compute(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
        ranks, experts = self.etp.world_size, counts_E.numel()
        counts_RE = counts_E.new_empty(ranks * experts)
        self.etp.all_gather(counts_RE, counts_E.contiguous(), name="etp.counts").wait()
        counts_RE = counts_RE.view(ranks, experts)
        rows_R = counts_RE.sum(1).tolist()
        x_MD = all_to_all_autograd(x_ND.repeat(ranks, 1), [x_ND.shape[0]] * ranks, rows_R, self.etp, name="etp.gather")
        expert_of_M = torch.arange(experts, device=x_ND.device).repeat(ranks).repeat_interleave(counts_RE.flatten())
        order_M = torch.argsort(expert_of_M, stable=True)  # expert-major, source etp rank order within an expert
        y_MD = weights(x_MD[order_M], counts_RE.sum(0).tolist())
        y_source_major_MD = y_MD.new_empty(y_MD.shape).index_copy(0, order_M, y_MD)
        partial_RND = all_to_all_autograd(
            y_source_major_MD, rows_R, [x_ND.shape[0]] * ranks, self.etp, name="etp.reduce"
        )
        return partial_RND.view(ranks, *x_ND.shape).sum(0)
