"""The FSSDP engine: one MoE layer's step, in order.

    plan      the policy turns (owners, load estimate) into a materialized placement - at the end of each step;
              with ``auto`` budgets, t and m come from the group's agreed measurements (``measured.py``)
    gather    SparseAllGather(owners -> materialized), issued before the block's attention, waited before experts
    calibrate (``fssdp.calibrate``) once the router has counted the real tokens (summed over the group), the plan
              is corrected when the saving beats the extra gather (``calibration.py``); the extra copies are
              gathered at once (on the critical path), and this forward's dispatch, compute and reduce-scatter
              use the corrected placement
    dispatch  each (token, expert) pair to one holder (``parallel/moe/assignment.py``): levelling first - every
              copy of a replicated expert gets a quota that levels the devices' row totals - then locality: each
              quota is filled with the holder's own pairs, then pairs from its node, then from any rank. Local
              first would keep each source's pairs on its own copy and leave the owners' imbalance in place:
              rows max/mean 1.07-1.27 against 1.00 under the skew benchmark's routing with t = m = 2
              (``benchmarks/dispatch_rule.py``, docs/BENCHMARKS.md)
    compute   every held expert's rows in one matmul chain, with owned weights or gathered replicas
    combine   the reverse all-to-all
    reduce    in backward, SparseReduceScatter(materialized -> owners) sums every copy's gradient on the owner:
              issued when backward leaves the layer's experts, waited at the end of backward (an autograd
              callback) that adds the sums to the owners' ``.grad`` - so it travels under attention backward
    [RM]      re-materialization: replicas freed after forward and gathered again in backward; the gather of
              the next layer backward reaches is issued when this layer's is done, so it travels under this
              layer's backward and the attention backward in between
    reshard   every K steps, ownership moves (weights and the whole per-expert optimizer state) so that hot
              experts spread over ranks
A step whose plan has no replicas skips gather, stacks and reduce: the owners compute with their own weights,
exactly expert parallelism.

Only owners hold an expert's master weights and optimizer state, so expert memory per rank equals expert
parallelism's; the optimizer updates the owned rows. Everything here runs identically on every rank of the
group: plans come from the same global counts, so the collectives agree.

Shapes: E experts, O owned experts, H held experts (owned + replicas), C floats in one expert's chunk.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from hecate.collectives import (
    ChunkSpec,
    MaterializedPlacement,
    OwnerPlacement,
    SparseAllGather,
    SparseReduceScatter,
    Transport,
)
from hecate.collectives.handle import Handle
from hecate.parallel.activation_checkpoint import recomputing
from hecate.parallel.config import AUTO, FssdpConfig
from hecate.parallel.fssdp.budgets import replica_bytes
from hecate.parallel.fssdp.calibration import calibrate
from hecate.parallel.fssdp.load import LoadEstimator
from hecate.parallel.fssdp.measured import Measurements, free_device_bytes, should_probe
from hecate.parallel.fssdp.policies import Policy, build_policy
from hecate.parallel.fssdp.resharding import initial_owners, reshard_owners
from hecate.parallel.moe import ExpertWeights, MoE

WEIGHTS = ("w1", "w2", "w3")


class ShardedExperts(nn.Module):
    """Replaces a layer's ``Experts``: holds the owned experts' weights [O, ...] (rows in ascending expert order)
    and computes the held experts with weights the engine materializes."""

    def __init__(self, experts: nn.Module, owned: Sequence[int], fssdp_layer: FssdpLayer):
        super().__init__()
        self.activation = experts.activation
        rows = torch.tensor(owned, dtype=torch.long, device=experts.w1.device)
        for name in WEIGHTS:
            full = getattr(experts, name)
            setattr(self, name, None if full is None else nn.Parameter(full.detach()[rows].clone()))
        self.fssdp_layer = fssdp_layer  # not an nn.Module: a plain attribute, outside the module tree

    def weights(self) -> list[torch.Tensor]:
        return [w for w in (self.w1, self.w2, self.w3) if w is not None]

    def forward(
        self, x_ND: torch.Tensor, counts_H: torch.Tensor, first: int = 0, weights: ExpertWeights | None = None
    ) -> torch.Tensor:
        """Held experts first, first + 1, ... on ``counts_H`` rows each (the ``Experts`` contract)."""
        weights = weights or self.unbound()
        if not self.training or recomputing():  # a recomputation's rows were counted by its forward
            return weights(x_ND, counts_H.tolist(), first)
        start = time.perf_counter()
        out = weights(x_ND, counts_H.tolist(), first)
        self.fssdp_layer.computed(x_ND.shape[0], time.perf_counter() - start)
        return out

    def unbound(self) -> ExpertWeights:
        """The held experts' weights, materialized once per forward however many chunks the dispatcher runs.
        Without replicas (every rank holds just what it owns) they are the owned weights themselves: no stacks
        to build, and backward's gradients land on the owners with no reduce-scatter - plain EP's cost."""
        fl = self.fssdp_layer
        if not fl.replicas:
            return ExpertWeights(self.w1, self.w2, self.w3, self.activation)
        if recomputing() and fl.forward_held is not None:  # activation checkpointing: no gather of its own
            w1, w2, *w3 = fl.forward_held
            return ExpertWeights(w1, w2, w3[0] if w3 else None, self.activation)
        if fl.held is None:
            fl.held = _Materialize.apply(fl, *self.weights())
        w1, w2, *w3 = fl.held
        return ExpertWeights(w1, w2, w3[0] if w3 else None, self.activation)


class _Materialize(torch.autograd.Function):
    """Owned weights in, held-expert weight stacks out; backward issues the sum of every copy's gradient on its
    owner and returns no gradient itself: the sums reach the owned weights' ``.grad`` at the end of backward."""

    @staticmethod
    def forward(ctx, fl: FssdpLayer, *owned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.fl, ctx.owner, ctx.materialized = fl, fl.owner, fl.materialized
        stacks = fl.build_held_stacks(fl.wait_replicas(), owned)
        fl.held_stacks, fl.held_placement = stacks, fl.materialized
        return tuple(stacks)

    @staticmethod
    def backward(ctx, *grads_H: torch.Tensor):
        fl = ctx.fl
        pending = fl.start_reduce(ctx.owner, ctx.materialized, grads_H)
        # PyTorch has no public "end of this backward" callback; FSDP2 waits for its reduce-scatters with this call
        torch.autograd.Variable._execution_engine.queue_callback(lambda: fl.finish_reduce(pending, ctx.owner))
        return (None,) * (1 + len(grads_H))


class FssdpLayer:
    """One MoE layer under FSSDP: its owners, the step's plan and this forward's placement (the plan, or its
    calibration), load estimate and collectives. ``measurements`` (shared by the engine's layers; None when
    nothing is derived from them) receives this layer's timings as ``index``."""

    def __init__(self, layer: MoE, transport: Transport, cfg: FssdpConfig, measurements: Measurements | None = None):
        experts, ranks = layer.cfg.num_experts, transport.world_size
        self.layer, self.transport, self.cfg = layer, transport, cfg
        self.measurements = measurements
        self.index = measurements.add_layer() if measurements is not None else 0
        self.policy: Policy | None = None  # the step's, with its budgets; set by the engine's plan
        self.budgets = (0, 0)  # the step's (overlap, memory) budgets
        self.owner = initial_owners(experts, ranks)
        self.planned = MaterializedPlacement.from_owner(self.owner)  # the step's plan
        self.materialized = self.planned  # this forward's placement: the plan or its calibration
        self.held_placement = self.planned  # the placement the held stacks were built for (RM gathers it again)
        self.block_start: float | None = None  # when the block's forward began (measuring its attention)
        self.awaiting_counts = False  # this forward has not calibrated yet
        self.calibrated = 0  # forwards of this step whose placement calibration corrected
        self.last_calibrated = 0
        self.estimator = LoadEstimator(experts, cfg.window)
        self.step_counts_E = torch.zeros(experts, dtype=torch.long, device="cpu")  # the planner's: host memory
        self.rows_computed = 0  # (token, expert) rows this rank computed in this step
        self.last_rows = 0  # ... in the step that ended last
        full = layer.experts
        self.shapes = [tuple(getattr(full, n).shape[1:]) for n in WEIGHTS if getattr(full, n) is not None]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.spec = ChunkSpec.flat(sum(self.sizes), full.w1.dtype)
        self.pending: Handle | None = None
        self.extra: Handle | None = None  # calibration's extra copies
        self.regather: Handle | None = None  # RM: the backward gather, issued ahead by the layer after this one
        self.held: tuple[torch.Tensor, ...] | None = None  # this forward's materialized stacks (autograd outputs)
        self.forward_held: tuple[torch.Tensor, ...] | None = None  # the last forward's, for its recomputation
        self.held_stacks: list[torch.Tensor] = []

    def shard(self, experts: nn.Module) -> ShardedExperts:
        """The layer's whole ``Experts`` cut to the rows this rank owns, computing with this layer's plan."""
        return ShardedExperts(experts, self.owner.chunks_on(self.transport.rank), self)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def bytes_per_replica(self) -> int:
        """What one replica costs a device: its weights and their gradient."""
        return replica_bytes(sum(self.sizes), self.spec.dtype.itemsize)

    @property
    def device(self) -> torch.device:
        """Where this layer's experts live, and so its exchange buffers."""
        return self.layer.experts.w1.device

    # ---- forward: gather replicas, calibrate, build the held stacks ------------------------------

    @property
    def replicas(self) -> int:
        """Copies beyond the owners in this forward's placement (the same on every rank)."""
        return _replicas(self.materialized)

    @property
    def planned_replicas(self) -> int:
        """Copies beyond the owners in this step's plan."""
        return _replicas(self.planned)

    def block_starts(self) -> None:
        """The block's forward pre-hook: this forward starts from the step's plan, whose gather is issued now
        (it travels while the attention runs)."""
        self.materialized = self.planned
        self.awaiting_counts = self.layer.training
        self.block_start = time.perf_counter() if self.layer.training else None
        self.start_gather()

    def router_starts(self) -> None:
        """The router's forward pre-hook: the block's non-MoE part is over."""
        if self.block_start is not None and self.measurements is not None:
            self.measurements.add_non_moe(self.index, time.perf_counter() - self.block_start)
        self.block_start = None

    def counted(self, counts_E: torch.Tensor) -> None:
        """The router's counts of this forward (the first sub-batch's, summed over the group): with
        ``fssdp.calibrate``, correct the placement when it pays, and gather the new copies at once."""
        if not (self.awaiting_counts and self.cfg.calibrate):
            return
        self.awaiting_counts = False
        costs = self.measurements.calibration_costs()
        if costs is None:  # nothing measured yet: keep the plan
            return
        row_seconds, bandwidth = costs
        result = calibrate(
            self.policy,
            self.owner,
            self.planned,
            counts_E.detach().cpu(),
            row_seconds=row_seconds,
            expert_bytes=self.spec.nbytes,
            gather_bytes_per_s=bandwidth,
        )
        if not result.corrected:
            return
        self.materialized = result.placement
        self.calibrated += 1
        new = [
            (e, d)
            for e, holders in enumerate(result.placement.devices_C)
            for d in holders
            if d not in self.planned.devices_C[e]
        ]
        if new:
            self.extra = self._gather(self.owner, MaterializedPlacement.from_owner(self.owner, new))

    def drain(self) -> None:
        """After the forward: wait for gathers it issued but did not use (calibration may drop every replica,
        and the experts then compute with the owned weights), so no stale copy reaches the next forward."""
        for handle in (self.pending, self.extra):
            if handle is not None:
                handle.wait()
        self.pending = self.extra = None

    def computed(self, rows: int, seconds: float) -> None:
        """The held experts' forward ran on ``rows`` rows in ``seconds``."""
        self.rows_computed += rows
        if self.measurements is not None:
            self.measurements.add_rows(rows, seconds)

    def start_gather(self) -> None:
        """Issue the gather of this step's planned replicas (before the block's attention runs)."""
        if self.pending is None and self.planned_replicas:
            self.pending = self._gather(self.owner, self.planned)

    def wait_replicas(self) -> dict[int, torch.Tensor]:
        """The replicas this forward holds: the plan's and calibration's extra copies."""
        self.start_gather()
        replicas = self.pending.wait() if self.pending is not None else {}
        if self.extra is not None:
            replicas = {**replicas, **self.extra.wait()}
        self.pending = self.extra = None
        return replicas

    def _gather(self, owner: OwnerPlacement, materialized: MaterializedPlacement) -> Handle:
        gather = SparseAllGather(owner, materialized, self.spec, self.transport, device=self.device)
        sent = {e for e, devices in enumerate(materialized.devices_C) if len(devices) > 1}
        return gather.start(self.owned_chunks(sent))

    def owned_chunks(self, sent: set[int] | None = None) -> dict[int, torch.Tensor]:
        """Each owned expert's weights as one flat chunk (w1, w2[, w3] concatenated). With ``sent``, only those
        experts are packed: the others never leave this rank, and a zero-stride placeholder of the chunk's shape
        (no memory, no copy) stands in for them, since the gather checks every owned chunk's spec."""
        weights = self.layer.experts.weights()
        unsent = torch.empty(1, dtype=self.spec.dtype, device=weights[0].device).expand(self.spec.shape)
        return {
            e: torch.cat([w[i].detach().reshape(-1) for w in weights]) if sent is None or e in sent else unsent
            for i, e in enumerate(self.owner.chunks_on(self.rank))
        }

    def build_held_stacks(self, replicas: dict[int, torch.Tensor], owned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per weight, the [H, ...] stack of the experts this forward's placement puts here, in ascending order:
        owned rows or replicas."""
        return [torch.stack(self.held_rows(j, replicas, owned, self.materialized)) for j in range(len(self.shapes))]

    def held_rows(
        self,
        j: int,
        replicas: dict[int, torch.Tensor],
        owned: Sequence[torch.Tensor],
        placement: MaterializedPlacement,
    ) -> list[torch.Tensor]:
        """Weight ``j`` of every expert ``placement`` puts here, in ascending order: views of owned rows or of
        received replicas (detached)."""
        position = {e: i for i, e in enumerate(self.owner.chunks_on(self.rank))}
        offset, size, shape = _offsets(self.sizes)[j], self.sizes[j], self.shapes[j]
        return [
            (owned[j][position[e]] if e in position else replicas[e][offset : offset + size].view(shape)).detach()
            for e in placement.chunks_on(self.rank)
        ]

    # ---- backward: sum every copy's gradient on its owner ----------------------------------------

    def start_reduce(
        self, owner: OwnerPlacement, materialized: MaterializedPlacement, grads_H: Sequence[torch.Tensor | None]
    ) -> Handle[dict[int, torch.Tensor]]:
        """Issue SparseReduceScatter of the held experts' gradients; ``finish_reduce`` waits for it."""
        held = materialized.chunks_on(self.rank)
        device = self.layer.experts.w1.device
        grads_H = [
            g if g is not None else torch.zeros((len(held), *s), device=device) for g, s in zip(grads_H, self.shapes)
        ]
        copies = {e: torch.cat([g[h].reshape(-1) for g in grads_H]) for h, e in enumerate(held)}
        return SparseReduceScatter(owner, materialized, self.spec, self.transport, device=self.device).start(copies)

    def finish_reduce(self, pending: Handle[dict[int, torch.Tensor]], owner: OwnerPlacement) -> None:
        """At the end of backward: add every owned expert's summed gradient to its weights' ``.grad``."""
        summed = pending.wait()
        owned = owner.chunks_on(self.rank)
        for param, shape, size, offset in zip(
            self.layer.experts.weights(), self.shapes, self.sizes, _offsets(self.sizes)
        ):
            grad = torch.stack([summed[e][offset : offset + size].view(shape) for e in owned])
            param.grad = grad if param.grad is None else param.grad.add_(grad)

    # ---- re-materialization --------------------------------------------------------------------

    def free_replicas(self) -> None:
        """After forward (RM mode): drop the held stacks' memory; autograd keeps views of them."""
        for stack in self.held_stacks:
            stack.untyped_storage().resize_(0)

    def start_regather(self) -> None:
        """RM: issue the backward gather ahead of time (no-op when this forward freed nothing)."""
        if self.held_stacks and self.regather is None:
            self.regather = self._gather(self.owner, self.held_placement)

    def rematerialize(self) -> None:
        """When backward reaches the layer (RM mode): wait for the replicas and refill the held stacks."""
        if not self.held_stacks:  # this forward built none (no replicas)
            return
        self.start_regather()
        replicas, self.regather = self.regather.wait(), None
        owned = self.layer.experts.weights()
        for j, stack in enumerate(self.held_stacks):  # row by row into the old storage: no second stack
            stack.untyped_storage().resize_(stack.numel() * stack.element_size())
            # write through an alias with its own version counter: autograd saved views of ``stack``
            alias = torch.empty(0, dtype=stack.dtype, device=stack.device).set_(
                stack.untyped_storage(), stack.storage_offset(), stack.shape, stack.stride()
            )
            for h, row in enumerate(self.held_rows(j, replicas, owned, self.held_placement)):
                alias[h].copy_(row)
        self.held_stacks = []

    # ---- between steps -------------------------------------------------------------------------

    def end_step(self) -> None:
        self.estimator.update(self.step_counts_E)
        self.step_counts_E = torch.zeros_like(self.step_counts_E)
        self.last_rows, self.rows_computed = self.rows_computed, 0
        self.last_calibrated, self.calibrated = self.calibrated, 0
        self.forward_held = None

    def plan(self, policy: Policy, budgets: tuple[int, int]) -> None:
        """The next step's plan, made by ``policy`` (built with ``budgets``: overlap, memory)."""
        self.policy, self.budgets = policy, budgets
        self.planned = self.materialized = policy.materialize(self.owner, self.estimator.estimate())

    def move_ownership(self, new: OwnerPlacement, optimizer: torch.optim.Optimizer | None) -> None:
        """Hand owned experts to their new owners with their whole per-expert optimizer state (every state tensor
        shaped like the weight: AdamW's moments, or whatever the optimizer keeps) and last gradients; the math is
        unchanged. Scalar state (AdamW's ``step``) is the same on every rank and stays."""
        if new == self.owner:
            return
        params = self.layer.experts.weights()
        states = [optimizer.state.get(p, {}) if optimizer is not None else {} for p in params]
        state_keys = sorted(k for k in states[0] if all(_per_expert(s.get(k), p) for s, p in zip(states, params)))
        with_grad = all(p.grad is not None for p in params)
        tensors = [
            [p.detach(), *(s[k] for k in state_keys), *([p.grad] if with_grad else [])] for p, s in zip(params, states)
        ]
        flat_rows = [t for group in tensors for t in group]  # per weight: weight, state, gradient
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in flat_rows])  # lossless for every part
        old_owned = self.owner.chunks_on(self.rank)
        chunks = {e: torch.cat([t[i].reshape(-1).to(dtype) for t in flat_rows]) for i, e in enumerate(old_owned)}
        moved = [(e, new.owner_C[e]) for e in range(new.num_chunks) if new.owner_C[e] != self.owner.owner_C[e]]
        spec = ChunkSpec.flat(sum(t[0].numel() for t in flat_rows), dtype)
        received = SparseAllGather(
            self.owner, MaterializedPlacement.from_owner(self.owner, moved), spec, self.transport, device=self.device
        )(chunks)
        new_owned = new.chunks_on(self.rank)
        rows = [chunks[e] if e in chunks else received[e] for e in new_owned]
        sizes = [t[0].numel() for t in flat_rows]
        rebuilt = [
            torch.stack([r[o : o + n] for r in rows]).view(len(new_owned), *t.shape[1:]).to(t.dtype)
            for t, n, o in zip(flat_rows, sizes, _offsets(sizes))
        ]
        per_weight = 1 + len(state_keys) + with_grad
        for j, (param, state) in enumerate(zip(params, states)):
            param.data = rebuilt[j * per_weight].clone()
            for m, key in enumerate(state_keys):
                state[key] = rebuilt[j * per_weight + 1 + m].clone()
            if with_grad:
                param.grad = rebuilt[j * per_weight + per_weight - 1].clone()
        self.owner = new

    # ---- whole tensors (for tests and checkpoints) ----------------------------------------------

    def full(self, local_O: torch.Tensor) -> torch.Tensor:
        """An owned-rows tensor [O, ...] gathered into expert order [E, ...] (collective)."""
        ranks = self.transport.world_size
        gathered = local_O.new_empty((local_O.shape[0] * ranks, *local_O.shape[1:]))
        self.transport.all_gather(gathered, local_O.contiguous(), name="fssdp.gather_full").wait()
        per_rank = local_O.shape[0]
        index = [r * per_rank + self.owner.chunks_on(r).index(e) for e, r in enumerate(self.owner.owner_C)]
        return gathered[torch.tensor(index, device=gathered.device)]

    def local(self, full_E: torch.Tensor) -> torch.Tensor:
        return full_E[torch.tensor(self.owner.chunks_on(self.rank), device=full_E.device)].clone()


class FssdpEngine:
    """All MoE layers of a model under one policy, over the ranks of ``transport`` (which carries the sparse
    collectives and ownership moves). :class:`~hecate.parallel.expert_sharding.FullySharded` adds the layers and
    wires them into the model."""

    def __init__(self, transport: Transport, cfg: FssdpConfig):
        self.cfg = cfg
        self.transport = transport
        self.derived = AUTO in (cfg.overlap_budget, cfg.memory_budget)
        # fixed budgets: one policy for every layer and step, checked now; ``auto``: built at each plan
        self.policy = None if self.derived else self._policy(cfg.overlap_budget, cfg.memory_budget)
        self.measurements = Measurements() if self.derived or cfg.calibrate else None
        self.layers: dict[str, FssdpLayer] = {}
        self.steps = 0
        self.last_replicas: dict[str, int] = {}  # planned replicas per layer in the step that ended last
        self.last_budgets: dict[str, tuple[int, int]] = {}  # its (overlap, memory) budgets per layer
        self.last_calibrated: dict[str, int] = {}  # its forwards whose placement calibration corrected

    def _policy(self, overlap: int, memory: int) -> Policy:
        cfg = self.cfg
        return build_policy(cfg.policy, overlap, memory, cfg.devices_per_node or None, cfg.min_imbalance)

    def add_layer(self, name: str, layer: MoE) -> FssdpLayer:
        """Start managing the MoE layer called ``name`` (its experts still whole)."""
        fl = FssdpLayer(layer, self.transport, self.cfg, self.measurements)
        self.layers[name] = fl
        return fl

    def budgets(self, fl: FssdpLayer) -> tuple[int, int]:
        """(overlap, memory) budgets of ``fl`` for the next step: the configured numbers, or derived from the
        group's agreed measurements (0 - plain EP - until they exist)."""
        cfg, experts, ranks = self.cfg, fl.layer.cfg.num_experts, self.transport.world_size
        overlap, memory = cfg.overlap_budget, cfg.memory_budget
        if overlap == AUTO:
            overlap = self.measurements.overlap_budget(fl.index, fl.spec.nbytes, experts)
        if memory == AUTO:
            # without re-materialization every layer's replicas live until its backward; with it, two at a time
            alive = min(2, len(self.layers)) if cfg.rematerialize else len(self.layers)
            memory = self.measurements.memory_budget(cfg.memory_cap_mib, fl.bytes_per_replica, experts, ranks, alive)
        return overlap, memory

    @property
    def device(self) -> torch.device:
        """Where the managed experts' weights live (the CPU before any layer is added)."""
        layers = list(self.layers.values())
        return layers[0].layer.experts.w1.device if layers else torch.device("cpu")

    def plan(self) -> None:
        for fl in self.layers.values():
            budgets = self.budgets(fl)
            fl.plan(self.policy or self._policy(*budgets), budgets)

    def _probe(self) -> None:
        """Time a blocking SparseAllGather of every expert of the first layer to the next rank after its owner
        (several copies, as a step's gather has: one copy alone would time mostly the collective's latency), and
        read the free memory."""
        fl = next(iter(self.layers.values()))
        owner, ranks = fl.owner, self.transport.world_size
        copies = [(e, (owner.owner_C[e] + 1) % ranks) for e in range(owner.num_chunks)]
        gather = SparseAllGather(
            owner, MaterializedPlacement.from_owner(owner, copies), fl.spec, self.transport, device=fl.device
        )
        chunks = fl.owned_chunks()
        self.transport.barrier(name="fssdp.probe").wait()
        start = time.perf_counter()
        received = gather(chunks)
        seconds = max(time.perf_counter() - start, 1e-9)
        bandwidth = len(received) * fl.spec.nbytes / seconds
        self.measurements.add_probe(bandwidth if received else math.inf, free_device_bytes(fl.layer.experts.w1.device))

    def after_forward(self, fl: FssdpLayer, out: torch.Tensor) -> None:
        """After the block's forward: count its load; in RM mode free the replicas until backward needs them."""
        stats = fl.layer.stats
        fl.forward_held, fl.held = fl.held, None
        fl.drain()
        if fl.layer.training:
            fl.step_counts_E += stats.counts_E.to("cpu", fl.step_counts_E.dtype)
        if self.cfg.rematerialize and out.requires_grad:
            fl.free_replicas()
            out.register_hook(lambda grad, fl=fl: (self._rematerialize(fl), grad)[1])

    def _rematerialize(self, fl: FssdpLayer) -> None:
        """Refill this layer's replicas, then prefetch those of the layer backward reaches next."""
        fl.rematerialize()
        layers = list(self.layers.values())
        index = layers.index(fl)
        if index > 0:
            layers[index - 1].start_regather()

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step: roll the load windows, re-shard now and then, plan the next step."""
        self.steps += 1
        self.last_replicas = self.replicas()
        self.last_budgets = {name: fl.budgets for name, fl in self.layers.items()}
        for fl in self.layers.values():
            fl.end_step()
        self.last_calibrated = {name: fl.last_calibrated for name, fl in self.layers.items()}
        if self.measurements is not None:
            if should_probe(self.steps) and self.transport.world_size > 1:
                self._probe()
            self.measurements.agree(self.transport, self.device)
        if self.cfg.reshard_every and self.steps % self.cfg.reshard_every == 0:
            owners = reshard_owners(
                [fl.estimator.estimate() for fl in self.layers.values()],
                self.transport.world_size,
                self.cfg.devices_per_node or None,
            )
            for fl, owner in zip(self.layers.values(), owners):
                fl.move_ownership(owner, optimizer)
        self.plan()

    def state_dict(self) -> dict:
        """Owners and load windows (the same on every rank): a resumed run plans exactly as an uninterrupted one."""
        return {
            "steps": self.steps,
            "layers": {
                name: {"owner": list(fl.owner.owner_C), "load": fl.estimator.state_dict()}
                for name, fl in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore owners and load windows before the weights are loaded (they are sliced by owner)."""
        self.steps = int(state["steps"])
        for name, fl in self.layers.items():
            fl.owner = OwnerPlacement(tuple(state["layers"][name]["owner"]), self.transport.world_size)
            fl.estimator.load_state_dict(state["layers"][name]["load"])
        self.plan()

    def layer_of(self, param_name: str) -> FssdpLayer | None:
        """The FSSDP layer whose expert weight ``param_name`` is (e.g. ``blocks.1.ffn.experts.w1``)."""
        prefix, _, weight = param_name.rpartition(".experts.")
        return self.layers.get(prefix) if weight in WEIGHTS else None

    def replicas(self) -> dict[str, int]:
        """Replicas (copies beyond the owners) per layer in the current plan."""
        return {name: fl.planned_replicas for name, fl in self.layers.items()}


def _replicas(placement: MaterializedPlacement) -> int:
    """Copies beyond the owners."""
    return sum(len(devices) for devices in placement.devices_C) - placement.num_chunks


def _per_expert(value: object, param: torch.Tensor) -> bool:
    """Optimizer state that has one row per owned expert (shaped like the weight) moves with the expert."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
