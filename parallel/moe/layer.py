"""The MoE layer, read top to bottom: route -> sums (reduced) -> capacity -> dispatch -> experts -> combine.

``forward`` is ``begin`` (route, issue the dispatch) then ``finish`` (experts, combine). A block that splits its
batch (``moe.overlap_sub_batches``) begins each sub-batch after its attention and finishes them together, so one
sub-batch's tokens travel while the next one's attention computes.

Two seams are attributes that parallelism replaces from outside, the layer's code staying as it is:
- ``dispatcher`` (:mod:`.dispatcher`): expert parallelism swaps :class:`LocalDispatcher` for one that exchanges
  rows with all-to-all between dispatch and combine (and ``experts`` then holds only the local experts).
- ``reduce`` (:mod:`.losses`): data parallelism swaps :func:`local_reduce` for an all-reduce of the router sums
  over the ranks that share a micro-batch, so that aux loss, z-loss and capacity dropping equal the values of one
  process holding the whole micro-batch.

After each forward ``stats`` holds the router losses, unscaled (the trainer multiplies by aux_loss_coef and
z_loss_coef), and the load. Losses and counts are over the reduce group; on one device, over this forward's tokens.

Shapes: B batch, S sequence, T = B * S tokens, D model dim, E experts, K experts per token, N kept pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hecate.parallel.config import MoEConfig
from hecate.parallel.moe.capacity import dropped_pairs, expert_capacity, keep_within_capacity
from hecate.parallel.moe.dispatcher import Dispatcher, LocalDispatcher
from hecate.parallel.moe.experts import Experts
from hecate.parallel.moe.ffn import FeedForward
from hecate.parallel.moe.losses import Reduce, RouterSums, add_sums, aux_loss, local_reduce, router_sums, z_loss
from hecate.parallel.moe.router import Router


@dataclass
class MoEStats:
    """The last forward's router losses (unscaled, differentiable) and expert load (detached)."""

    aux_loss: torch.Tensor  # fp32 scalar, Switch/GShard load-balancing loss
    z_loss: torch.Tensor  # fp32 scalar, router z-loss
    counts_E: torch.Tensor  # long, (token, k) pairs routed to each expert before dropping
    dropped: int  # pairs dropped by capacity (0 when dropless)
    tokens: int  # tokens routed


@dataclass
class StartedMoE:
    """One sub-batch between :meth:`MoE.begin` and :meth:`MoE.finish`: routed, its rows on their way."""

    x_BSD: torch.Tensor
    x_TD: torch.Tensor
    sums: RouterSums  # reduced over the reduce group
    capacity: int | None
    flight: Any  # the dispatcher's


class MoE(nn.Module):
    """x_BSD -> y_BSD (same shape and dtype). Weights: router gate and experts ~ Normal(0, init_std); the
    experts' (and shared experts') output matrix ~ Normal(0, out_init_std), default init_std - pass
    init_std / sqrt(2 * n_layers) to scale it like the other residual projections."""

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dispatcher: Dispatcher | None = None,
        reduce: Reduce = local_reduce,
    ):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg.num_experts, cfg.top_k, cfg.score, cfg.renormalize, cfg.bias_update_rate)
        nn.init.normal_(self.router.gate.weight, std=init_std)
        self.experts = Experts(cfg.num_experts, dim, cfg.ffn_dim, cfg.activation, init_std, out_init_std)
        # k shared experts of hidden size F add up to one FFN of hidden size k F
        self.shared = (
            FeedForward(dim, cfg.shared_hidden, cfg.activation, init_std, out_init_std) if cfg.shared_experts else None
        )
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.num_experts)
        self.reduce = reduce
        self.on_counts: Callable[[torch.Tensor], None] | None = None  # FSSDP calibrates its plan with them
        self.stats: MoEStats | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.finish([self.begin(x_BSD)])[0]

    def begin(self, x_BSD: torch.Tensor) -> StartedMoE:
        """Route one (sub-)batch and issue its dispatch; what runs before :meth:`finish` overlaps the exchange."""
        cfg = self.cfg
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        sums = self.reduce(router_sums(routing, cfg.num_experts))
        if self.on_counts is not None:  # the reduced counts, before dispatch (FSSDP's calibration)
            self.on_counts(sums.counts_E)
        capacity = expert_capacity(cfg.capacity_factor, sums.tokens, cfg.top_k, cfg.num_experts)
        keep_TK = None if capacity is None else keep_within_capacity(routing.experts_TK, capacity, sums.offset_E)
        flight = self.dispatcher.start(x_TD, routing.experts_TK, keep_TK, routing.weights_TK)
        return StartedMoE(x_BSD, x_TD, sums, capacity, flight)

    def finish(self, started: list[StartedMoE]) -> list[torch.Tensor]:
        """The experts and the combine of every begun sub-batch, in order -> their outputs y_BSD. The stats are
        those of the whole batch: the sub-batches' router sums are added before the losses are formed."""
        cfg = self.cfg
        capacity = started[0].capacity
        if len(started) > 1 and capacity is not None:
            raise ValueError(
                "capacity dropping ranks the pairs of the whole batch: sub-batches need dropless "
                "routing (capacity_factor=0)"
            )
        weights = self.experts.unbound()
        for s in started:
            self.dispatcher.compute(s.flight, self.experts, weights)
        shared = [self.shared_output(s.x_TD) for s in started] if self.shared is not None else None  # under combines
        outs = []
        for i, s in enumerate(started):
            out_TD = self.dispatcher.end(s.flight)
            if shared is not None:
                out_TD = out_TD + shared[i]
            outs.append(out_TD.to(s.x_BSD.dtype).view_as(s.x_BSD))
        sums = add_sums([s.sums for s in started])
        self.stats = MoEStats(
            aux_loss=aux_loss(sums, cfg.top_k),
            z_loss=z_loss(sums),
            counts_E=sums.counts_E.detach(),
            dropped=dropped_pairs(sums.counts_E, capacity),
            tokens=sums.tokens,
        )
        return outs

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output, scaled per token by sigmoid(x_TD w_gate) when gated (Qwen2-MoE)."""
        out_TD = self.shared(x_TD)
        return out_TD if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)) * out_TD

    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: call after the optimizer step with the step's global counts."""
        self.router.update_bias(counts_E)
