"""The four systems that ``benchmarks/peers.py`` times side by side, all built from the same seed-0 MoE layer:
``hecate-ep``, ``hecate-fssdp``, ``deepspeed-dropless`` and ``deepspeed-cf1`` (peers.py's docstring says what
each one is). Each exposes one training step and what the agreement check compares: output, gradients, routing.

Shapes: T tokens per rank, D model dim, F expert hidden dim, E experts, P ranks, L = E / P local experts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from peers import Config

SYSTEMS = ("hecate-ep", "hecate-fssdp", "deepspeed-dropless", "deepspeed-cf1")


def hecate_moe(config: Config, capacity_factor: float = 0.0):
    """The full layer with seed-0 weights (every system's starting point)."""
    from hecate.parallel.config import MoEConfig
    from hecate.parallel.moe import MoE

    cfg = MoEConfig(
        num_experts=config.experts,
        top_k=config.top_k,
        ffn_dim=config.ffn_dim,
        activation="gelu",
        score="softmax",
        renormalize=True,
        capacity_factor=capacity_factor,
    )
    torch.manual_seed(0)
    return MoE(config.dim, cfg, init_std=0.02)


class System:
    """One system's layer on this rank: ``step`` runs forward + backward and returns the slowest rank's seconds."""

    name: str
    module: nn.Module

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Between steps, untimed (e.g. the FSSDP engine plans the next step)."""

    def step(self, x_TD: torch.Tensor) -> tuple[float, float]:
        """(the slowest rank's wall seconds, the CPU seconds of all ranks together) of forward + backward."""
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.forward(x_TD).square().mean().backward()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        self.module.zero_grad(set_to_none=True)
        x_TD.grad = None
        self.after_step()
        slowest, cpu_total = torch.tensor([seconds], dtype=torch.float64), torch.tensor([cpu], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu_total)
        return slowest.item(), cpu_total.item()

    def expert_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of every expert's w1 [E, D, F] and w2 [E, F, D], gathered from their ranks."""
        raise NotImplementedError

    def gate_grad(self) -> torch.Tensor:
        raise NotImplementedError

    def counts(self) -> torch.Tensor:
        """Pairs routed to each expert in the last forward, summed over ranks (before any dropping)."""
        raise NotImplementedError

    def rows_computed(self) -> int:
        """Rows this rank's experts computed in the last step (padding included)."""
        raise NotImplementedError


def _gather_experts(local_LXY: torch.Tensor) -> torch.Tensor:
    """[L, ...] on every rank (rank p holding experts [p L, (p + 1) L)) -> [E, ...]."""
    parts = [torch.empty_like(local_LXY) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local_LXY.contiguous())
    return torch.cat(parts)


class HecateEP(System):
    name = "hecate-ep"

    def __init__(self, config: Config):
        from hecate.collectives import CommStats, TorchTransport
        from hecate.parallel.data_parallel import router_sums_reduce
        from hecate.parallel.expert_sharding import ExpertParallel

        transport = TorchTransport(None, CommStats())
        self.module = hecate_moe(config)
        ExpertParallel(transport, None, 1).wrap(self.module)
        self.module.reduce = router_sums_reduce(transport)

    def forward(self, x_TD):
        return self.module(x_TD)

    def expert_grads(self):
        experts = self.module.experts
        return _gather_experts(experts.w1.grad), _gather_experts(experts.w2.grad)

    def gate_grad(self):
        return self.module.router.gate.weight.grad

    def counts(self):
        return self.module.stats.counts_E

    def rows_computed(self):
        return int(self.counts().view(dist.get_world_size(), -1)[dist.get_rank()].sum())


class HecateFSSDP(HecateEP):
    name = "hecate-fssdp"

    def __init__(self, config: Config, policy: str = "fssdp"):
        from hecate.collectives import CommStats, TorchTransport
        from hecate.parallel.config import FssdpConfig
        from hecate.parallel.data_parallel import router_sums_reduce
        from hecate.parallel.expert_sharding import FullySharded

        transport = TorchTransport(None, CommStats())
        self.module = hecate_moe(config)
        self.module.reduce = router_sums_reduce(transport)  # global counts: every rank plans the same
        self.holder = nn.Sequential(self.module)  # the engine gathers replicas in a pre-hook on the MoE's parent
        sharding = FullySharded(transport, FssdpConfig(policy=policy))
        sharding.wrap(self.holder)
        self.engine = sharding.engine
        (self.layer,) = self.engine.layers.values()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.0)

    def after_step(self):
        self.engine.end_step(self.optimizer)

    def forward(self, x_TD):
        return self.holder(x_TD)

    def expert_grads(self):
        experts = self.module.experts
        return self.layer.full(experts.w1.grad), self.layer.full(experts.w2.grad)

    def rows_computed(self):
        return self.layer.last_rows


class DeepSpeedMoE(System):
    def __init__(self, config: Config, drop_tokens: bool):
        from deepspeed.moe.layer import MoE

        world, rank = dist.get_world_size(), dist.get_rank()
        local = config.experts // world
        expert = nn.Sequential(
            nn.Linear(config.dim, config.ffn_dim, bias=False),
            nn.GELU(),
            nn.Linear(config.ffn_dim, config.dim, bias=False),
        )
        self.name = "deepspeed-dropless" if not drop_tokens else "deepspeed-cf1"
        self.module = MoE(
            config.dim,
            expert,
            num_experts=config.experts,
            ep_size=world,
            k=config.top_k,
            capacity_factor=1.0,
            drop_tokens=drop_tokens,
            top2_2nd_expert_sampling=False,
        )
        self.module.set_deepspeed_parallelism()
        reference = hecate_moe(config)
        with torch.no_grad():
            self.module.deepspeed_moe.gate.wg.weight.copy_(reference.router.gate.weight)
            for i, ds_expert in enumerate(self.experts):
                ds_expert[0].weight.copy_(reference.experts.w1[rank * local + i].t())
                ds_expert[2].weight.copy_(reference.experts.w2[rank * local + i].t())
        self.capacity_factor = None if not drop_tokens else 1.0
        self.capacity = -(-config.tokens * config.top_k // config.experts)  # pairs per (rank, expert) at factor 1.0

    @property
    def experts(self) -> list[nn.Sequential]:
        return list(self.module.deepspeed_moe.experts.deepspeed_experts)

    def forward(self, x_TD):
        out, _aux, self.last_counts = self.module(x_TD)
        return out

    def expert_grads(self):
        w1 = torch.stack([e[0].weight.grad.t() for e in self.experts])
        w2 = torch.stack([e[2].weight.grad.t() for e in self.experts])
        return _gather_experts(w1), _gather_experts(w2)

    def gate_grad(self):
        return self.module.deepspeed_moe.gate.wg.weight.grad

    def counts(self):
        counts = self.last_counts.clone()
        dist.all_reduce(counts)
        return counts

    def rows_computed(self):
        """E x C: every (source rank, local expert) slot is padded to the capacity C."""
        if self.capacity_factor is None:  # dropless: C is the largest (rank, expert) count in the group
            capacity = self.last_counts.max().clone()
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
        else:
            capacity = self.capacity
        return len(self.experts) * dist.get_world_size() * int(capacity)

    def dropped_pairs(self, config: Config) -> int:
        """Pairs beyond each expert's per-rank capacity in the last forward, summed over ranks."""
        dropped = (self.last_counts - self.capacity).clamp_min(0).sum()
        dist.all_reduce(dropped)
        return int(dropped)


def build(name: str, config: Config) -> System:
    if name == "hecate-ep":
        return HecateEP(config)
    if name == "hecate-fssdp":
        return HecateFSSDP(config)
    return DeepSpeedMoE(config, drop_tokens=name == "deepspeed-cf1")
