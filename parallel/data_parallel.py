"""Data parallelism: router statistics over the ranks that share a micro-batch, and gradient averaging.

Why DDP-style (one all-reduce of flat gradient buckets after backward) and not FSDP2 for the dense parameters:
the models this trains keep their dense weights small next to their experts, whose memory FSSDP shards itself;
averaging every gradient in one fixed order keeps every layout bit-for-bit comparable with the single-process
reference, and it needs no wrapping of the model. Dense sharding (FSDP2 ``fully_shard``) can be added for the
dense blocks without touching anything here.

Two groups carry gradients:
- dense parameters (attention, norms, embeddings, routers, shared experts) are replicated over the dense ``dp``
  group and averaged there;
- expert parameters are split over ``ep`` and replicated over ``edp``; backward of the token exchange already
  brought every EP peer's contribution home, so they are summed over ``edp`` and divided by the same ``dp``.
Each rank's loss is the mean over its own tokens, so the average over ``dp`` ranks is the global-batch mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hecate.collectives import Transport, all_reduce_autograd
from hecate.parallel.moe.losses import Reduce, RouterSums


def router_sums_reduce(transport: Transport) -> Reduce:
    """The MoE layer's ``reduce`` hook over the ranks that split one micro-batch (in data order): sums counts,
    probabilities and z-loss terms, keeps autograd through the sums, and gives each rank the pairs of every
    expert on earlier ranks (``offset_E``) so capacity dropping drops what one process would."""

    def reduce(sums: RouterSums) -> RouterSums:
        ranks, experts = transport.world_size, sums.counts_E.numel()
        local_counts = torch.cat([sums.counts_E, sums.counts_E.new_tensor([sums.tokens])])
        counts_RE = local_counts.new_empty(ranks * (experts + 1))
        transport.all_gather(counts_RE, local_counts, name="moe.router_counts").wait()
        counts_RE = counts_RE.view(ranks, experts + 1)
        summed = all_reduce_autograd(
            torch.cat([sums.prob_sum_E, sums.lse_sq_sum.view(1)]), transport, name="moe.router_sums"
        )
        return RouterSums(
            counts_E=counts_RE[:, :experts].sum(0),
            prob_sum_E=summed[:experts],
            lse_sq_sum=summed[experts],
            tokens=int(counts_RE[:, experts].sum()),
            offset_E=counts_RE[: transport.rank, :experts].sum(0),
        )

    return reduce


class GradientAverager:
    """After backward: average dense gradients over ``dense_dp`` and expert gradients over ``expert_dp``, each
    group in one flat all-reduce. ``dp`` is the number of ranks that split the global batch. ``reduce_dtype`` is
    what the all-reduce carries (``train.grad_reduce_dtype``): bf16 halves the bytes and rounds each rank's
    gradient once before the sum; the gradients themselves stay fp32."""

    def __init__(
        self,
        dense: list[nn.Parameter],
        experts: list[nn.Parameter],
        dense_dp: Transport,
        expert_dp: Transport | None,
        dp: int,
        reduce_dtype: torch.dtype = torch.float32,
    ):
        self.buckets = [(dense, dense_dp, "grad.dense"), (experts, expert_dp, "grad.experts")]
        self.dp = dp
        self.reduce_dtype = reduce_dtype

    def __call__(self) -> None:
        for params, transport, name in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if not grads:
                continue
            if transport is not None and transport.world_size > 1:
                flat = _flatten_dense_tensors(grads)
                wire = flat if flat.dtype == self.reduce_dtype else flat.to(self.reduce_dtype)
                transport.all_reduce(wire, name=name).wait()
                if wire is not flat:
                    flat.copy_(wire)
                grads_synced = _unflatten_dense_tensors(flat, grads)
            else:
                grads_synced = grads
            for param, grad in zip(params, grads_synced):
                param.grad = grad.div_(self.dp) if self.dp > 1 else grad


def global_grad_norm(
    dense: Iterable[nn.Parameter], experts: Iterable[nn.Parameter], expert_shards: Transport | None
) -> torch.Tensor:
    """L2 norm (fp64) of all gradients of the model: dense ones are the same on every rank, expert ones are split
    over ``expert_shards`` (the EP group; None on one device), whose squared norms are summed."""
    dense, experts = list(dense), list(experts)
    device = (dense + experts)[0].device if dense + experts else torch.device("cpu")
    dense_sq = _squared_norm(dense, device)
    expert_sq = _squared_norm(experts, device)
    if expert_shards is not None and expert_shards.world_size > 1:
        expert_sq = expert_shards.all_reduce(expert_sq, name="grad.norm").wait()
    return (dense_sq + expert_sq).sqrt()


def _squared_norm(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([g.detach().double().square().sum() for g in grads]).sum()
