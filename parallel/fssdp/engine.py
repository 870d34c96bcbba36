"""The FSSDP engine: one MoE layer's step, in order.

    plan      the policy turns (owners, load estimate) into a materialized placement - at the end of each step
    gather    SparseAllGather(owners -> materialized), issued before the block's attention, waited before experts
    dispatch  each (token, expert) pair to one holder: local copy first, else spread over the holders
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
from hecate.parallel.config import FssdpConfig
from hecate.parallel.fssdp.load import LoadEstimator
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
        if self.training and not recomputing():
            self.fssdp_layer.rows_computed += x_ND.shape[0]
        return (weights or self.unbound())(x_ND, counts_H.tolist(), first)

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
        fl.held_stacks = stacks
        return tuple(stacks)

    @staticmethod
    def backward(ctx, *grads_H: torch.Tensor):
        fl = ctx.fl
        pending = fl.start_reduce(ctx.owner, ctx.materialized, grads_H)
        # PyTorch has no public "end of this backward" callback; FSDP2 waits for its reduce-scatters with this call
        torch.autograd.Variable._execution_engine.queue_callback(lambda: fl.finish_reduce(pending, ctx.owner))
        return (None,) * (1 + len(grads_H))


class FssdpLayer:
    """One MoE layer under FSSDP: its owners, current materialized placement, load estimate and collectives."""

    def __init__(self, layer: MoE, transport: Transport, policy: Policy, cfg: FssdpConfig):
        experts, ranks = layer.cfg.num_experts, transport.world_size
        self.layer, self.transport, self.policy, self.cfg = layer, transport, policy, cfg
        self.owner = initial_owners(experts, ranks)
        self.materialized = MaterializedPlacement.from_owner(self.owner)
        self.estimator = LoadEstimator(experts, cfg.window)
        self.step_counts_E = torch.zeros(experts, dtype=torch.long, device="cpu")  # the planner's: host memory
        self.rows_computed = 0  # (token, expert) rows this rank computed in this step
        self.last_rows = 0  # ... in the step that ended last
        full = layer.experts
        self.shapes = [tuple(getattr(full, n).shape[1:]) for n in WEIGHTS if getattr(full, n) is not None]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.spec = ChunkSpec.flat(sum(self.sizes), full.w1.dtype)
        self.pending: Handle | None = None
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
    def device(self) -> torch.device:
        """Where this layer's experts live, and so its exchange buffers."""
        return self.layer.experts.w1.device

    # ---- forward: gather replicas, build the held stacks -----------------------------------------

    @property
    def replicas(self) -> int:
        """Copies beyond the owners in this step's plan (the same on every rank)."""
        return sum(len(devices) for devices in self.materialized.devices_C) - self.owner.num_chunks

    def start_gather(self) -> None:
        """Issue the gather of this step's replicas (before the block's attention runs)."""
        if self.pending is None and self.replicas:
            self.pending = self._gather(self.owner, self.materialized)

    def wait_replicas(self) -> dict[int, torch.Tensor]:
        self.start_gather()
        replicas, self.pending = self.pending.wait(), None
        return replicas

    def _gather(self, owner: OwnerPlacement, materialized: MaterializedPlacement) -> Handle:
        gather = SparseAllGather(owner, materialized, self.spec, self.transport, device=self.device)
        return gather.start(self.owned_chunks())

    def owned_chunks(self) -> dict[int, torch.Tensor]:
        """Each owned expert's weights as one flat chunk (w1, w2[, w3] concatenated)."""
        weights = self.layer.experts.weights()
        return {
            e: torch.cat([w[i].detach().reshape(-1) for w in weights])
            for i, e in enumerate(self.owner.chunks_on(self.rank))
        }

    def build_held_stacks(self, replicas: dict[int, torch.Tensor], owned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per weight, the [H, ...] stack of the held experts in ascending order: owned rows or replicas."""
        position = {e: i for i, e in enumerate(self.owner.chunks_on(self.rank))}
        stacks = []
        for j, (shape, offset) in enumerate(zip(self.shapes, _offsets(self.sizes))):
            rows = [
                owned[j][position[e]] if e in position else replicas[e][offset : offset + self.sizes[j]].view(shape)
                for e in self.materialized.chunks_on(self.rank)
            ]
            stacks.append(torch.stack([r.detach() for r in rows]))
        return stacks

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
            self.regather = self._gather(self.owner, self.materialized)

    def rematerialize(self) -> None:
        """When backward reaches the layer (RM mode): wait for the replicas and refill the held stacks."""
        if not self.held_stacks:  # this forward built none (no replicas)
            return
        self.start_regather()
        replicas, self.regather = self.regather.wait(), None
        fresh = self.build_held_stacks(replicas, self.layer.experts.weights())
        for stack, values in zip(self.held_stacks, fresh):
            stack.untyped_storage().resize_(values.numel() * values.element_size())
            # write through an alias with its own version counter: autograd saved views of ``stack``
            alias = torch.empty(0, dtype=stack.dtype, device=stack.device).set_(
                stack.untyped_storage(), stack.storage_offset(), stack.shape, stack.stride()
            )
            alias.copy_(values)
        self.held_stacks = []

    # ---- between steps -------------------------------------------------------------------------

    def end_step(self) -> None:
        self.estimator.update(self.step_counts_E)
        self.step_counts_E = torch.zeros_like(self.step_counts_E)
        self.last_rows, self.rows_computed = self.rows_computed, 0
        self.forward_held = None

    def plan(self) -> None:
        self.materialized = self.policy.materialize(self.owner, self.estimator.estimate())

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
        self.policy = build_policy(
            cfg.policy, cfg.overlap_budget, cfg.memory_budget, cfg.devices_per_node or None, cfg.min_imbalance
        )
        self.layers: dict[str, FssdpLayer] = {}
        self.steps = 0
        self.last_replicas: dict[str, int] = {}  # replicas per layer in the step that ended last

    def add_layer(self, name: str, layer: MoE) -> FssdpLayer:
        """Start managing the MoE layer called ``name`` (its experts still whole)."""
        fl = FssdpLayer(layer, self.transport, self.policy, self.cfg)
        self.layers[name] = fl
        return fl

    @property
    def device(self) -> torch.device:
        """Where the managed experts' weights live (the CPU before any layer is added)."""
        layers = list(self.layers.values())
        return layers[0].layer.experts.w1.device if layers else torch.device("cpu")

    def plan(self) -> None:
        for fl in self.layers.values():
            fl.plan()

    def after_forward(self, fl: FssdpLayer, out: torch.Tensor) -> None:
        """After the block's forward: count its load; in RM mode free the replicas until backward needs them."""
        stats = fl.layer.stats
        fl.forward_held, fl.held = fl.held, None
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
        for fl in self.layers.values():
            fl.end_step()
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
            fl.plan()

    def layer_of(self, param_name: str) -> FssdpLayer | None:
        """The FSSDP layer whose expert weight ``param_name`` is (e.g. ``blocks.1.ffn.experts.w1``)."""
        prefix, _, weight = param_name.rpartition(".experts.")
        return self.layers.get(prefix) if weight in WEIGHTS else None

    def replicas(self) -> dict[str, int]:
        """Replicas (copies beyond the owners) per layer in the current plan."""
        return {name: fl.replicas for name, fl in self.layers.items()}


def _per_expert(value: object, param: torch.Tensor) -> bool:
    """Optimizer state that has one row per owned expert (shaped like the weight) moves with the expert."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
