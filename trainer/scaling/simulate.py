"""The scale simulator: one training iteration of a model on a cluster under each placement policy, step by
step through a routing source, with the training code's own planning pieces:

    for every step:  for every group and MoE layer
        materialized = policy.materialize(owner, estimator.estimate())   # parallel/fssdp/policies.py (the planner)
        counts_RE    = routing.counts_RE(step, layer, ...)               # this step's pairs per source rank
        cost         = layer_step(...)                                   # .cost: phases, bytes from gather_plan
        estimator.update(global counts)                                  # parallel/fssdp/load.py
    every reshard_every steps (fssdp): owners = reshard_owners(estimates)  # parallel/fssdp/resharding.py

The FSSDP group is G = min(gpus, E) devices (every device owns E / G experts of each layer, as the engine
requires); with more GPUs than experts the gpus / G groups hold the same experts and all-reduce their
gradients (expert data parallelism), as expert parallelism does at that scale. Groups are contiguous devices,
so a group of 64 spans 8 nodes of 8. At most ``max_groups`` groups are simulated (the slowest counts); they
differ only in the routing of their ranks, and the gradient all-reduce over all of them is modelled.
The first ``window`` steps fill the load estimate and are not counted.

The baselines keep expert parallelism's owners (their systems do not re-shard); ``fssdp`` re-shards every
``reshard_every`` steps when asked (Hecate's heterogeneous sharding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hecate.collectives.errors import ConfigError
from hecate.collectives.plan import ChunkSpec
from hecate.parallel.fssdp import (
    LoadEstimator,
    build_policy,
    initial_owners,
    moves,
    overlap_budget,
    reshard_owners,
)
from hecate.trainer.scaling.cluster import Cluster
from hecate.trainer.scaling.comm import all_reduce_time, exchange_time
from hecate.trainer.scaling.cost import STATE_BYTES_PER_PARAM, Overlap, Phases, layer_step, memory_bytes
from hecate.trainer.scaling.loads import Routing
from hecate.trainer.scaling.workload import BACKWARD_OVER_FORWARD, Workload

CHUNK_DTYPES = {2: "bfloat16", 4: "float32"}


@dataclass(frozen=True)
class Settings:
    gpus: int
    overlap_budget: int | None = None  # None: derived from the cluster (see derived_overlap_budget)
    memory_budget: int = 2
    min_imbalance: float = 1.0  # fssdp.min_imbalance
    window: int = 5
    reshard_every: int = 0
    rematerialize: bool = False
    steps: int = 10
    overlap: Overlap = field(default_factory=Overlap)
    max_groups: int = 4  # groups simulated when gpus > E (they differ only in their ranks' routing)


@dataclass
class PolicyResult:
    policy: str
    gpus: int
    group_size: int
    overlap_budget: int
    memory_budget: int
    step_s: float  # mean over the measured steps
    phases: Phases  # mean over the measured steps, of the slowest group
    memory: dict[str, float]  # bytes per device (largest device)
    replicas_per_device: float  # mean replicas a device holds per layer
    rows_max_over_mean: float  # expert rows of the busiest device over the mean (1.0 = balanced)
    step_times_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "policy": self.policy,
            "gpus": self.gpus,
            "group_size": self.group_size,
            "overlap_budget": self.overlap_budget,
            "memory_budget": self.memory_budget,
            "step_ms": 1e3 * self.step_s,
            "phases_ms": {k: 1e3 * v for k, v in self.phases.as_dict().items()},
            "memory_gib": {k: v / 2**30 for k, v in self.memory.items()},
            "memory_total_gib": sum(self.memory.values()) / 2**30,
            "replicas_per_device": self.replicas_per_device,
            "rows_max_over_mean": self.rows_max_over_mean,
        }


def group_size(workload: Workload, cluster: Cluster, gpus: int) -> int:
    """Devices of one FSSDP group; checks that the layout exists (the field named in the error)."""
    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {gpus}")
    if gpus > cluster.gpus_per_node and gpus % cluster.gpus_per_node:
        raise ConfigError("--gpus", f"{gpus} GPUs do not fill whole nodes of {cluster.gpus_per_node} ({cluster.name})")
    size = min(gpus, workload.num_experts)
    if workload.num_experts % size or gpus % size:
        raise ConfigError(
            "--gpus",
            f"{gpus} GPUs cannot be split into groups that each own all "
            f"{workload.num_experts} experts equally (need E % min(gpus, E) == 0 and "
            f"gpus % min(gpus, E) == 0)",
        )
    return size


def chunk_spec(workload: Workload, cluster: Cluster) -> ChunkSpec:
    import torch

    return ChunkSpec.flat(workload.expert_params, getattr(torch, CHUNK_DTYPES[cluster.dtype_bytes]))


def derived_overlap_budget(workload: Workload, cluster: Cluster, group: int) -> int:
    """Expert copies that arrive while one block's attention runs forward (the engine's ``auto`` rule,
    :func:`~hecate.parallel.fssdp.budgets.overlap_budget`): attention time x the slowest link a copy may take (a
    GPU's share of its node's NICs when the group spans nodes) / one expert's bytes, at most E."""
    attention = workload.attention_flops(workload.tokens_per_gpu) / cluster.device.flops_per_s
    per_gpu = (
        cluster.inter.bytes_per_s / cluster.gpus_per_node
        if group > cluster.gpus_per_node
        else cluster.intra.bytes_per_s
    )
    return overlap_budget(attention, per_gpu, chunk_spec(workload, cluster).nbytes, workload.num_experts)


def gradient_sync_time(workload: Workload, cluster: Cluster, gpus: int, group: int) -> float:
    """Dense gradients all-reduced over every GPU, then owned expert gradients over the gpus / G groups; the
    trainer does both after backward (not overlapped)."""
    if workload.block_only:
        return 0.0
    dense = all_reduce_time(
        workload.dense_params * cluster.dtype_bytes, gpus, cluster, spans_nodes=gpus > cluster.gpus_per_node
    )
    owned_bytes = (workload.num_experts // group) * len(workload.moe_layers) * workload.expert_params
    experts = all_reduce_time(
        owned_bytes * cluster.dtype_bytes,
        gpus // group,
        cluster,
        spans_nodes=group >= cluster.gpus_per_node,
        rings_per_node=cluster.gpus_per_node,
    )
    return dense + experts


def simulate_policy(
    workload: Workload, cluster: Cluster, routing: Routing, policy_name: str, settings: Settings
) -> PolicyResult:
    gpus = settings.gpus
    group = group_size(workload, cluster, gpus)
    per_node = cluster.gpus_per_node if group > cluster.gpus_per_node else None
    budget = (
        settings.overlap_budget
        if settings.overlap_budget is not None
        else derived_overlap_budget(workload, cluster, group)
    )
    policy = build_policy(policy_name, budget, settings.memory_budget, per_node, settings.min_imbalance, "--policy")
    reshard_every = settings.reshard_every if policy_name == "fssdp" else 0
    chunk = chunk_spec(workload, cluster)
    layers, groups = workload.moe_layers, min(gpus // group, settings.max_groups)
    owners = [[initial_owners(workload.num_experts, group) for _ in layers] for _ in range(groups)]
    estimators = [[LoadEstimator(workload.num_experts, settings.window) for _ in layers] for _ in range(groups)]
    sync = gradient_sync_time(workload, cluster, gpus, group)
    non_moe = sum(
        3 * workload.dense_block_flops(workload.tokens_per_gpu) for i in range(workload.n_layers) if i not in layers
    ) + (1 + BACKWARD_OVER_FORWARD) * workload.head_flops(workload.tokens_per_gpu)
    step_times, mean_phases, replicas, spreads = [], Phases(), [], []
    replicas_LD, rows_LD = None, None
    total_steps = settings.window + settings.steps
    for step in range(total_steps):
        counts_LRE = [
            routing.counts_RE(step, layer, groups * group, workload.pairs_per_gpu) for layer in range(len(layers))
        ]
        slowest, measured = None, step >= settings.window
        for g in range(groups):
            phases = Phases(attention=non_moe / cluster.device.flops_per_s, gradient_sync=sync)
            group_replicas, group_rows = [], []
            for layer in range(len(layers)):
                counts_RE = counts_LRE[layer][g * group : (g + 1) * group]
                if measured:  # window steps only fill the estimate (policies are stateless): no cost to compute
                    owner = owners[g][layer]
                    materialized = policy.materialize(owner, estimators[g][layer].estimate())
                    cost = layer_step(
                        workload,
                        cluster,
                        owner,
                        materialized,
                        counts_RE,
                        g * group,
                        per_node,
                        settings.overlap,
                        settings.rematerialize,
                        chunk,
                    )
                    phases.add(cost.phases)
                    group_replicas.append(cost.replicas_D)
                    group_rows.append(cost.rows_D)
                estimators[g][layer].update(counts_RE.sum(0).tolist())
            if reshard_every and (step + 1) % reshard_every == 0:
                moved_bytes = STATE_BYTES_PER_PARAM * workload.expert_params
                phases.gradient_sync += _reshard(
                    owners[g], estimators[g], group, per_node, cluster, g * group, moved_bytes
                )
            if slowest is None or phases.total > slowest[0].total:
                slowest = (phases, group_replicas, group_rows)
        if measured:
            phases, group_replicas, group_rows = slowest
            step_times.append(phases.total)
            mean_phases.add(phases)
            replicas.append(float(np.mean(group_replicas)))
            rows = np.sum(group_rows, axis=0)
            spreads.append(float(rows.max() / max(rows.mean(), 1e-9)))
            replicas_LD = group_replicas if replicas_LD is None else np.maximum(replicas_LD, group_replicas)
            rows_LD = group_rows
    for name, value in mean_phases.as_dict().items():
        setattr(mean_phases, name, value / settings.steps)
    memory = memory_bytes(
        workload, group, np.asarray(replicas_LD), rows_LD, cluster.dtype_bytes, settings.rematerialize
    )
    return PolicyResult(
        policy_name,
        gpus,
        group,
        budget,
        settings.memory_budget,
        float(np.mean(step_times)),
        mean_phases,
        memory,
        float(np.mean(replicas)),
        float(np.mean(spreads)),
        step_times,
    )


def _reshard(
    owners_L: list,
    estimators_L: list,
    group: int,
    per_node: int | None,
    cluster: Cluster,
    first_device: int,
    moved_bytes: float,
) -> float:
    """Heterogeneous re-sharding of one group (in place); returns the seconds its ownership moves take (each
    moved expert carries fp32 weights, gradients and AdamW moments)."""
    new_L = reshard_owners([e.estimate() for e in estimators_L], group, per_node)
    seconds = 0.0
    for layer, new in enumerate(new_L):
        bytes_DD = np.zeros((group, group))
        for _expert, src, dst in moves(owners_L[layer], new):
            bytes_DD[src, dst] += 1
        owners_L[layer] = new
        if bytes_DD.any():
            seconds += exchange_time(bytes_DD * moved_bytes, cluster, first_device)
    return seconds


def simulate(
    workload: Workload, cluster: Cluster, routing: Routing, policies: list[str], settings_per_gpus: list[Settings]
) -> list[PolicyResult]:
    """Every policy at every cluster size (one Settings per size)."""
    return [
        simulate_policy(workload, cluster, routing, policy, settings)
        for settings in settings_per_gpus
        for policy in policies
    ]


def speedups(results: list[PolicyResult], baseline: str = "ep") -> dict[tuple[int, str], float]:
    """(gpus, policy) -> baseline step time / policy step time."""
    base = {r.gpus: r.step_s for r in results if r.policy == baseline}
    return {(r.gpus, r.policy): base[r.gpus] / r.step_s for r in results if r.gpus in base}


def cluster_sizes(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop."""
    return [start * 2**i for i in range(int(math.log2(stop // start)) + 1)]
