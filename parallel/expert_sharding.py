"""How the experts of every MoE layer are held across the ranks: the one seam between a model's MoE layers and the
layout.

Three ways, one small class each, all with the same face (:class:`ExpertSharding`):

- :class:`Replicated`: every rank holds every expert (one process, or data parallelism alone); expert gradients
  are averaged like dense ones.
- :class:`ExpertParallel`: each rank of the ``ep`` group holds a contiguous block of E / ep experts; the tokens
  travel to them (all-to-all), and ranks that hold the same block (``edp``) average their gradients.
- :class:`FullySharded` (FSSDP): each expert has one owner among the stage's ranks; every step the policy's
  replicas are materialized where the tokens are (:mod:`hecate.parallel.fssdp.engine`), and owners receive the
  summed gradient of every copy, so no gradient is averaged afterwards.

Each gives: ``wrap`` (the one place that swaps a layer's experts and dispatcher), the gradient groups, ``full`` /
``local`` views of one expert tensor, and the form a checkpoint saves (``to_saved`` / ``from_saved``), so that a
checkpoint written under one way loads under another. ``Parallel._expert_sharding``
(:mod:`hecate.parallel.parallelize`) is the one place that picks.

Shapes: E experts, L local experts of this rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from hecate.collectives import Transport
from hecate.parallel.config import FssdpConfig
from hecate.parallel.fssdp.engine import FssdpEngine
from hecate.parallel.moe import MoE
from hecate.parallel.moe.ep_dispatcher import ExpertParallelDispatcher, Holders

EXPERT_WEIGHTS = ("w1", "w2", "w3")


class ExpertSharding(Protocol):
    """One way of holding experts, seen from one rank."""

    grad_sum: Transport | None  # ranks holding the same experts, whose gradients are summed after backward
    norm_group: Transport | None  # ranks over which each layer's experts are split (squared norms summed over it)
    copies: int  # ranks holding the same expert values (each counts 1 / copies in a world-wide norm)

    def wrap(self, model: nn.Module) -> None:
        """Hold this rank's experts of every MoE layer in ``model`` (built whole, from the run's seed)."""
        ...

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """An expert tensor (weight, gradient, optimizer moment) of parameter ``name`` as one process holds it,
        [E, ...]. Collective over the ranks that split the experts."""
        ...

    def local(self, name: str, full_E: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole [E, ...] expert tensor (undoes :meth:`full`)."""
        ...

    def to_saved(self, name: str, local: torch.Tensor) -> Any:
        """The form distributed checkpoint saves of a local expert tensor, so that every expert is saved once."""
        ...

    def from_saved(self, name: str, saved: Any) -> torch.Tensor:
        """Undo :meth:`to_saved` on a loaded tensor."""
        ...

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step (FSSDP plans the next step and re-shards now and then)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state a resumed run needs beyond the tensors."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """What the step that ended last did, for metrics.jsonl (collective over the ranks that split the experts)."""
        ...


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def named_moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, MoE]]:
    """(qualified name, parent module, layer) of every MoE layer; the parent is the block that runs it."""
    for name, module in list(model.named_modules()):
        for child_name, child in module.named_children():
            if isinstance(child, MoE):
                yield (f"{name}.{child_name}" if name else child_name), module, child


def expert_dispatcher(
    num_experts: int,
    transport: Transport,
    overlap_chunks: int,
    holders: Holders | None = None,
    ranks_per_node: int | None = None,
) -> ExpertParallelDispatcher:
    """The dispatcher that takes tokens to the ranks holding their experts (built here only)."""
    return ExpertParallelDispatcher(
        num_experts, transport, holders=holders, ranks_per_node=ranks_per_node, overlap_chunks=overlap_chunks
    )


class Replicated:
    """Every rank holds every expert; ``edp`` (None on one process) averages their gradients."""

    norm_group = None

    def __init__(self, edp: Transport | None = None, copies: int = 1):
        self.grad_sum, self.copies = edp, copies

    def wrap(self, model: nn.Module) -> None:
        pass

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return local

    def local(self, name: str, full_E: torch.Tensor) -> torch.Tensor:
        return full_E

    def to_saved(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return local

    def from_saved(self, name: str, saved: torch.Tensor) -> torch.Tensor:
        return saved

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return {}


class ExpertParallel(Replicated):
    """Rank r of ``ep`` holds experts [r L, (r + 1) L); ``edp`` holds the same block. A checkpoint saves each expert
    tensor as a DTensor sharded over ep and replicated over edp (``mesh`` is the [edp, ep] mesh)."""

    def __init__(self, ep: Transport, edp: Transport | None, copies: int, overlap_chunks: int = 1, mesh=None):
        super().__init__(edp, copies)
        self.ep, self.norm_group, self.overlap_chunks, self.mesh = ep, ep, overlap_chunks, mesh

    def wrap(self, model: nn.Module) -> None:
        for layer in moe_layers(model):
            keep_local_experts(layer, self.ep.rank, self.ep.world_size)
            layer.dispatcher = expert_dispatcher(layer.cfg.num_experts, self.ep, self.overlap_chunks)

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        local = local.contiguous()
        gathered = local.new_empty((local.shape[0] * self.ep.world_size, *local.shape[1:]))
        return self.ep.all_gather(gathered, local, name="gather_experts").wait()

    def local(self, name: str, full_E: torch.Tensor) -> torch.Tensor:
        return full_E.chunk(self.ep.world_size)[self.ep.rank].clone()

    def to_saved(self, name: str, local: torch.Tensor):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def from_saved(self, name: str, saved) -> torch.Tensor:
        return saved.to_local()


class FullySharded:
    """FSSDP over the stage's ranks ``transport`` (tokens on ``token_transport``: the same ranks, another group, so
    that a gather in flight does not hold up the exchanges behind it). Owners need not be contiguous, so a
    checkpoint saves each expert tensor whole, in expert order."""

    grad_sum = None  # owners already hold the sum over every rank's tokens
    copies = 1

    def __init__(
        self, transport: Transport, cfg: FssdpConfig, token_transport: Transport | None = None, overlap_chunks: int = 1
    ):
        self.norm_group, self.cfg = transport, cfg
        self.token_transport = token_transport or transport
        self.overlap_chunks = overlap_chunks
        self.engine = FssdpEngine(transport, cfg)

    def wrap(self, model: nn.Module) -> None:
        """Each layer's experts become its owned rows (:class:`~hecate.parallel.fssdp.engine.ShardedExperts`), its
        dispatcher sends tokens to any holder of this forward's placement, and the block that runs it gathers the
        step's replicas before its attention (a forward pre-hook) and hands the layer's load to the engine after
        it. The router's pre-hook ends the attention's timing (``auto`` budgets); the layer's ``on_counts`` hands
        the router's counts to calibration (``fssdp.calibrate``)."""
        engine = self.engine
        for name, block, layer in named_moe_layers(model):
            fl = engine.add_layer(name, layer)
            layer.experts = fl.shard(layer.experts)
            layer.dispatcher = expert_dispatcher(
                layer.cfg.num_experts,
                self.token_transport,
                self.overlap_chunks,
                holders=lambda fl=fl: fl.materialized.devices_C,
                ranks_per_node=self.cfg.devices_per_node or None,
            )
            block.register_forward_pre_hook(lambda _m, _args, fl=fl: fl.block_starts())
            layer.router.register_forward_pre_hook(lambda _m, _args, fl=fl: fl.router_starts())
            layer.on_counts = fl.counted
            block.register_forward_hook(lambda _m, _args, out, fl=fl: engine.after_forward(fl, out))
        engine.plan()

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return self.engine.layer_of(name).full(local)

    def local(self, name: str, full_E: torch.Tensor) -> torch.Tensor:
        return self.engine.layer_of(name).local(full_E)

    to_saved = full
    from_saved = local

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.end_step(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Owners and load windows, and the number of ranks the owners name."""
        return {"fssdp": self.engine.state_dict(), "dp": self.norm_group.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Owners saved on another number of ranks name ranks this layout does not have: this layout keeps its own
        owners and takes the load windows and step count."""
        if "fssdp" not in state:
            return
        saved = state["fssdp"]
        if state.get("dp", self.norm_group.world_size) != self.norm_group.world_size:
            saved = {
                **saved,
                "layers": {
                    name: {**layer, "owner": list(self.engine.layers[name].owner.owner_C)}
                    for name, layer in saved["layers"].items()
                },
            }
        self.engine.load_state_dict(saved)

    def metrics(self) -> dict[str, Any]:
        """Planned replicas and the (overlap, memory) budgets per layer, forwards whose placement calibration
        corrected (with ``fssdp.calibrate``), and the spread of computed expert rows over the ranks (max / mean;
        1.0 is level)."""
        engine, group = self.engine, self.norm_group
        rows = torch.zeros(group.world_size, dtype=torch.float64, device=engine.device)
        rows[group.rank] = sum(fl.last_rows for fl in engine.layers.values())
        rows = group.all_reduce(rows, name="metrics").wait()
        out = {
            "replicas": engine.last_replicas,
            "overlap_budget": {name: t for name, (t, _) in engine.last_budgets.items()},
            "memory_budget": {name: m for name, (_, m) in engine.last_budgets.items()},
            "expert_rows_max_over_mean": (rows.max() / rows.mean().clamp(min=1)).item(),
        }
        if self.cfg.calibrate:
            out["calibrated"] = engine.last_calibrated
        return out


def keep_local_experts(layer: MoE, ep_rank: int, ep: int) -> None:
    """Replace the layer's [E, ...] expert weights by this rank's block [L, ...]."""
    local = layer.cfg.num_experts // ep
    for name in EXPERT_WEIGHTS:
        weight = getattr(layer.experts, name)
        if weight is not None:
            setattr(layer.experts, name, nn.Parameter(weight.detach()[ep_rank * local : (ep_rank + 1) * local].clone()))
