"""One MoE layer's step on one group of devices, phase by phase, under the engine's overlap rules
(``parallel/fssdp/engine.py``):

    forward   attention || SparseAllGather      the gather is issued before the block's attention; only the part
                                                longer than the attention is exposed
              all-to-all dispatch -> experts (slowest device) -> all-to-all combine
    backward  [RM: SparseAllGather again, exposed: the engine waits for it when backward reaches the layer]
              all-to-all (combine's backward) -> experts x2 (slowest) -> all-to-all (dispatch's backward)
              attention backward || SparseReduceScatter   (``Overlap.reduce_scatter``; the engine as built
                                                waits for it, see docs/SCALING.md)

Every all-to-all waits for its slowest participant, so each phase costs its maximum over devices; attention is
the same everywhere (every device has the same tokens). When a node's devices share fewer cores than there are
devices (simulated CPU ranks, ``Cluster.cores_per_node``), a rank that waits in the all-to-all lends its core to
the busy ones, so the expert phase ends after the work-conserving share (``expert_phase_rows``).

Memory per device (an estimate, bytes): 16 per dense and owned expert parameter (weights, gradients, AdamW
moments and, in half precision, fp32 master weights); 2 copies (weights, gradients) of every replica a device
holds, summed over layers (at most one layer's with re-materialization); activations of 16 D values per token
for each block's attention part plus (D + 2 F) per expert row a device computes.

Shapes: R source ranks = D devices of the group, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.collectives.plan import ChunkSpec, gather_plan
from hecate.parallel.moe.assignment import rows_by_destination
from hecate.trainer.scaling.cluster import Cluster
from hecate.trainer.scaling.comm import exchange_time
from hecate.trainer.scaling.workload import BACKWARD_OVER_FORWARD, Workload

STATE_BYTES_PER_PARAM = 16
ATTENTION_ACTIVATION_VALUES = 16  # per token, in units of D


@dataclass(frozen=True)
class Overlap:
    """What the engine hides under attention."""

    gather: bool = True  # SparseAllGather under the block's attention forward
    reduce_scatter: bool = True  # SparseReduceScatter under the attention backward


@dataclass
class Phases:
    """Seconds per phase (exposed time only for the overlapped collectives); add up to the step."""

    attention: float = 0.0  # forward + backward of attention blocks, dense blocks and the head
    experts: float = 0.0  # forward + backward of the slowest device's expert rows
    all_to_all: float = 0.0  # token dispatch and combine, forward and backward
    gather: float = 0.0  # exposed SparseAllGather (and RM's second gather)
    reduce_scatter: float = 0.0  # exposed SparseReduceScatter
    gradient_sync: float = 0.0  # dense all-reduce, expert all-reduce over groups, ownership moves
    details: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "details")

    def add(self, other: Phases) -> None:
        for f in fields(self):
            if f.name != "details":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self) if f.name != "details"}


@dataclass(frozen=True)
class LayerStep:
    phases: Phases
    rows_D: np.ndarray  # expert rows computed per device
    replicas_D: np.ndarray  # replicas held per device
    gather_bytes: float  # summed over devices


def sparse_bytes(owner: OwnerPlacement, materialized: MaterializedPlacement, chunk: ChunkSpec) -> np.ndarray:
    """bytes_DD[src, dst] of SparseAllGather(owner -> materialized), from the collective's own compiled plan
    (SparseReduceScatter moves the transpose)."""
    plan = gather_plan(owner, materialized, (chunk,) * owner.num_chunks)
    return np.array([[len(dst) for dst in row] for row in plan.routes], dtype=np.float64) * chunk.nbytes


def expert_phase_rows(rows_D: np.ndarray, cluster: Cluster, first_device: int) -> float:
    """Rows whose compute, at a device's throughput while all of its node's devices compute, lasts as long as the
    expert phase. Devices with their own compute units: the busiest device's rows. N devices sharing C < N cores
    (at most one core each, idle ones lending theirs): the node finishes after max(busiest x C / N, mean) rows."""
    rows_D = np.asarray(rows_D, dtype=np.float64)
    node_D = (first_device + np.arange(len(rows_D))) // cluster.gpus_per_node
    longest = 0.0
    for node in np.unique(node_D):
        rows = rows_D[node_D == node]
        cores = min(cluster.cores_per_node or len(rows), len(rows))
        longest = max(longest, rows.max() * cores / len(rows), rows.mean())
    return longest


def layer_step(
    workload: Workload,
    cluster: Cluster,
    owner: OwnerPlacement,
    materialized: MaterializedPlacement,
    counts_RE: np.ndarray,
    first_device: int,
    ranks_per_node: int | None,
    overlap: Overlap,
    rematerialize: bool,
    chunk: ChunkSpec,
) -> LayerStep:
    flops = cluster.device.flops_per_s
    attention_f = workload.attention_flops(workload.tokens_per_gpu) / flops
    gather_DD = sparse_bytes(owner, materialized, chunk)
    gather = exchange_time(gather_DD, cluster, first_device) if gather_DD.any() else 0.0
    reduce_scatter = exchange_time(gather_DD.T, cluster, first_device) if gather_DD.any() else 0.0
    rows_RD = rows_by_destination(counts_RE, materialized.devices_C, ranks_per_node)
    row_bytes = workload.dim * cluster.dtype_bytes
    dispatch = exchange_time(rows_RD * row_bytes, cluster, first_device)
    combine = exchange_time(rows_RD.T * row_bytes, cluster, first_device)
    rows_D = rows_RD.sum(0)
    experts_f = workload.expert_flops(expert_phase_rows(rows_D, cluster, first_device)) / flops
    attention_b = BACKWARD_OVER_FORWARD * attention_f
    exposed_gather = max(gather - attention_f, 0.0) if overlap.gather else gather
    exposed_rs = max(reduce_scatter - attention_b, 0.0) if overlap.reduce_scatter else reduce_scatter
    phases = Phases(
        attention=attention_f + attention_b,
        experts=(1 + BACKWARD_OVER_FORWARD) * experts_f,
        all_to_all=2 * (dispatch + combine),
        gather=exposed_gather + (gather if rematerialize else 0.0),
        reduce_scatter=exposed_rs,
    )
    phases.details = {
        "gather_s": gather,
        "reduce_scatter_s": reduce_scatter,
        "dispatch_s": dispatch,
        "attention_fwd_s": attention_f,
    }
    owned = np.bincount(np.asarray(owner.owner_C), minlength=owner.world_size)
    held = np.array([len(materialized.chunks_on(d)) for d in range(owner.world_size)])
    return LayerStep(phases, rows_D, held - owned, float(gather_DD.sum()))


def activation_bytes(workload: Workload, rows_D_per_layer: list[np.ndarray], dtype_bytes: int) -> float:
    """Activations kept for backward on the device that keeps the most."""
    tokens, dim = workload.tokens_per_gpu, workload.dim
    attention = ATTENTION_ACTIVATION_VALUES * dim * tokens * workload.n_layers
    dense = sum(2 * workload.dense_ffn_dim * tokens for i in range(workload.n_layers) if i not in workload.moe_layers)
    rows = np.sum(rows_D_per_layer, axis=0) if rows_D_per_layer else np.zeros(1)
    experts = (dim + 2 * workload.ffn_dim) * rows.max()
    head_bytes = 0 if workload.block_only else 4 * tokens * workload.vocab_size  # fp32 logits
    return float((attention + dense + experts) * dtype_bytes + head_bytes)


def memory_bytes(
    workload: Workload,
    group_size: int,
    replicas_LD: np.ndarray,
    rows_LD: list[np.ndarray],
    dtype_bytes: int,
    rematerialize: bool,
) -> dict[str, float]:
    """Peak memory per device (the largest device), by kind; see the module docstring."""
    owned = workload.num_experts // group_size * len(workload.moe_layers)
    replica_bytes = workload.expert_params * dtype_bytes * 2
    per_device_D = replicas_LD.max(0) if rematerialize else replicas_LD.sum(0)
    return {
        "parameters_and_optimizer": float(
            STATE_BYTES_PER_PARAM * (workload.dense_params + owned * workload.expert_params)
        ),
        "replicas": float(per_device_D.max() * replica_bytes) if len(per_device_D) else 0.0,
        "activations": activation_bytes(workload, rows_LD, dtype_bytes),
    }
