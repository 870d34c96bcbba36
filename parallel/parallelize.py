"""One run's parallel context: where this process sits in the layout, the transports of its groups, and what
changes in a model to run under that layout.

The trainer builds a :class:`Parallel` once (``Parallel.single()`` for one process, ``Parallel.from_world`` in a
worker whose process group is up), calls :meth:`Parallel.apply` on the freshly built model, and then only asks
it to average gradients, to take the global gradient norm and to reduce the numbers it logs. The model code
stays as it is: how experts are held (replicated, expert-parallel, FSSDP) is one
:class:`~hecate.parallel.expert_sharding.ExpertSharding`, which swaps each MoE layer's experts and ``dispatcher``;
data parallelism swaps the layer's ``reduce`` hook (:mod:`hecate.parallel.moe.layer`); tensor and pipeline
parallelism are :class:`~hecate.parallel.model_parallel.ModelParallel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hecate.collectives import CommStats, OpStats, TorchTransport, Transport, delta, transport_from_mesh
from hecate.collectives.errors import ConfigError
from hecate.collectives.simulated_network import SimulatedNetwork, SimulatedNetworkTransport
from hecate.collectives.timeline import Timeline
from hecate.parallel.config import FssdpConfig, MoEConfig, ParallelConfig
from hecate.parallel.data_parallel import GradientAverager, global_grad_norm, router_sums_reduce
from hecate.parallel.errors import LayoutError
from hecate.parallel.expert_sharding import ExpertParallel, ExpertSharding, FullySharded, Replicated, moe_layers
from hecate.parallel.fssdp.engine import FssdpEngine
from hecate.parallel.model_adapter import ModelAdapter
from hecate.parallel.model_parallel import ModelParallel
from hecate.parallel.pipeline import MicroBatch, Pipeline
from hecate.parallel.topology import Meshes, ParallelDims, build_meshes


@dataclass
class Parallel:
    """The layout of this run seen from one rank. Transports are None on one process."""

    dims: ParallelDims
    rank: int = 0
    meshes: Meshes | None = None
    dp: Transport | None = None  # dense data parallelism: the ranks that split each micro-batch
    ep: Transport | None = None  # expert parallelism: the ranks that split each layer's experts
    edp: Transport | None = None  # expert data parallelism: the ranks that hold the same experts
    stats: CommStats = field(default_factory=CommStats)
    experts: ExpertSharding = field(default_factory=Replicated)  # how every MoE layer's experts are held
    timeline: Timeline | None = None  # where the transports record collectives (``--profile-step``)
    _averager: GradientAverager | None = None
    model_parallel: ModelParallel | None = None  # tensor, expert-tensor and pipeline parallelism, when used
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes
    _last_stats: dict[str, OpStats] = field(default_factory=dict)

    @classmethod
    def single(cls, device: torch.device | None = None) -> Parallel:
        return cls(ParallelDims(world=1, dp=1, tp=1, pp=1, ep=1, etp=1), device=device or torch.device("cpu"))

    @classmethod
    def from_world(
        cls,
        dims: ParallelDims,
        cfg: ParallelConfig,
        moe: MoEConfig,
        fssdp: FssdpConfig | None = None,
        transport: str = "torch",
        network: SimulatedNetwork | None = None,
        timeline: Timeline | None = None,
        device: torch.device | None = None,
    ) -> Parallel:
        """Inside a worker whose default process group is initialised: build meshes and transports for ``dims``,
        the layout :func:`check_layout` validated (the trainer's ``layout_of`` adds its own checks).
        ``transport`` (``collectives.transport``) carries the MoE collectives; dense gradients stay on
        torch.distributed. With ``network`` the transports delay inter-node transfers (simulated cluster); with
        ``timeline`` they record when each collective was in flight (``--profile-step``). ``device`` is where this
        rank computes (the CPU when omitted); the meshes are of its type."""
        import torch.distributed as dist

        fssdp = fssdp if fssdp is not None else FssdpConfig()
        if dims.world != dist.get_world_size():
            raise LayoutError(
                f"the layout is for {dims.world} ranks, but the process group has {dist.get_world_size()}"
            )
        device = device or torch.device("cpu")
        if transport == "cupy" and device.type != "cuda":
            raise ConfigError(
                "collectives.transport",
                f"cupy carries CUDA tensors only, but this rank computes on {device}: set train.device=cuda on "
                f"GPU nodes, or collectives.transport=torch",
            )
        meshes = build_meshes(dims, device.type)
        stats = CommStats()
        observe = lambda t, mesh, dim: observed(t, mesh, dim, dims.world, network, timeline)  # noqa: E731
        parallel = cls(
            dims,
            rank=dist.get_rank(),
            meshes=meshes,
            stats=stats,
            timeline=timeline,
            device=device,
            dp=observe(TorchTransport.from_mesh(meshes.dense, "dp", stats), meshes.dense, "dp"),
            ep=observe(transport_from_mesh(transport, meshes.moe, "ep", stats), meshes.moe, "ep"),
            edp=observe(transport_from_mesh(transport, meshes.moe, "edp", stats), meshes.moe, "edp"),
        )
        if max(dims.tp, dims.pp, dims.etp) > 1:
            parallel.model_parallel = ModelParallel.build(dims, meshes, cfg, parallel.dp, stats)
        parallel.experts = parallel._expert_sharding(fssdp, moe.overlap_chunks)
        return parallel

    def _expert_sharding(self, fssdp: FssdpConfig, overlap_chunks: int) -> ExpertSharding:
        """The one place that picks how experts are held. FSSDP runs over the pipeline stage's ranks (dp x tp, in
        token order) with the tokens on the edp group: with ep = etp = 1 (required) the same ranks in the same
        order, another group, so the gathers in flight on the stage's group do not hold the all-to-alls up."""
        dims = self.dims
        if fssdp.enabled and dims.world > 1:
            stage = self.model_parallel.stage if self.model_parallel is not None else self.dp
            return FullySharded(stage, fssdp, token_transport=self.edp, overlap_chunks=overlap_chunks)
        if dims.ep > 1:
            return ExpertParallel(self.ep, self.edp, dims.edp, overlap_chunks, mesh=self.meshes.moe["edp", "ep"])
        return Replicated(self.edp, dims.edp)

    # ---- where this rank sits -------------------------------------------------------------------

    @property
    def dp_rank(self) -> int:
        return self.dp.rank if self.dp is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder's shared files (metrics, plots, summary)."""
        return self.rank == 0

    # ---- what changes in the model --------------------------------------------------------------

    def apply(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        micro: MicroBatch | None = None,
        grad_reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Hold the experts as the layout says, and reduce router statistics over the micro-batch's ranks. Call on a
        model that holds every expert (built from the run's seed), before the optimizer is built. Under tp, pp or
        etp the model is first cut to this rank's pipeline stages and split over tp, and its ``micro`` batches per
        step go through a pipeline schedule (:mod:`hecate.parallel.model_parallel`). ``adapter`` says where the
        model's parts are (:mod:`hecate.parallel.model_adapter`); data-parallel gradient all-reduces carry
        ``grad_reduce_dtype``."""
        mp = self.model_parallel
        if mp is not None:
            mp.split_model(model, adapter)
        self.experts.wrap(model)
        for layer in moe_layers(model):
            if mp is not None:
                mp.split_experts(layer)
            if self.dims.dp * self.dims.tp > 1:
                layer.reduce = mp.router_reduce() if mp is not None else router_sums_reduce(self.dp)
        if self.dims.world > 1:
            dense, experts = split_parameters(model)
            self._averager = (
                GradientAverager(dense, experts, self.dp, self.experts.grad_sum, self.dims.dp, grad_reduce_dtype)
                if mp is None
                else mp.averager(model, experts, self.dp, self.experts.grad_sum, grad_reduce_dtype)
            )
        if mp is not None:
            mp.build_pipeline(model, micro, self.cross_entropy)

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline schedule of this rank's stages (pp > 1), else None."""
        return self.model_parallel.pipeline if self.model_parallel is not None else None

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step: FSSDP rolls its load estimate, may re-shard, and plans the next step."""
        self.experts.end_step(optimizer)

    @property
    def engine(self) -> FssdpEngine | None:
        """The FSSDP engine when FSSDP holds the experts, else None."""
        return self.experts.engine if isinstance(self.experts, FullySharded) else None

    def average_gradients(self) -> None:
        """After the last backward of a step: every rank then holds the gradients of the global-batch loss."""
        if self._averager is not None:
            self._averager()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip all gradients by their global norm (over every rank's share); returns the norm before clipping."""
        dense, experts = split_parameters(model)
        if self.model_parallel is not None:
            norm = self.model_parallel.grad_norm(model, experts, self.experts.copies)
        else:
            norm = global_grad_norm(dense, experts, self.experts.norm_group)
        if max_norm < float("inf"):
            torch.nn.utils.clip_grads_with_norm_(dense + experts, max_norm, norm.float())
        return norm

    # ---- what the trainer reduces ---------------------------------------------------------------

    def data_mean(self, values: list[float]) -> list[float]:
        """Mean over the data-parallel ranks of per-rank numbers (local losses of equal-sized shares)."""
        if self.dp is None or self.dims.dp == 1:
            return values
        summed = self.data_sum(torch.tensor(values, dtype=torch.float64, device=self.device))
        return (summed / self.dims.dp).tolist()

    def data_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (e.g. validation nats, tokens and bytes)."""
        if self.dp is None or self.dims.dp == 1:
            return tensor
        return self.dp.all_reduce(tensor.clone(), name="metrics").wait()

    def cross_entropy(
        self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """fp32 cross-entropy of the model's logits (split over the vocabulary under tp)."""
        logits_NV, targets_N = logits_BSV.float().flatten(0, 1), targets_BS.flatten()
        if self.model_parallel is not None and self.model_parallel.tp is not None:
            return self.model_parallel.cross_entropy(logits_NV, targets_N, reduction)
        return torch.nn.functional.cross_entropy(logits_NV, targets_N, reduction=reduction)

    def forward(self, model: nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor | None:
        """The model's logits (forward only); under pp they come out on the last stage's ranks, None elsewhere."""
        if self.pipeline is None:
            return model(tokens_BS)
        shape = (tokens_BS.shape[0] // self.dims.tp, tokens_BS.shape[1], self.model_parallel.dim)
        return self.pipeline.forward(tokens_BS, shape)

    def pipeline_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the pipeline stages (values that only the last stage computes, e.g. validation nats)."""
        if self.pipeline is None:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.pipeline.group)
        return tensor

    def gather_full(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter-shaped tensors (weights, gradients) by name as one process holds the whole model: expert,
        tensor and pipeline shards gathered. Collective over the world; tests compare layouts with it."""
        if self.model_parallel is None:
            return self.gather_experts(model, tensors)
        return self.model_parallel.gather_full(model, tensors, self.gather_experts)

    def gather_experts(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` keyed by parameter name (weights, gradients), with every expert tensor whole as one process
        holds it; the others copied. Collective over the ranks that split the experts."""
        full = {name: t.detach().clone() for name, t in tensors.items()}
        for name in expert_state_names(model):
            if name in full:
                full[name] = self.experts.full(name, full[name])
        return full

    def to_checkpoint(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """A ``get_state_dict`` pair ({"model": ..., "optim": ...}) in the form distributed checkpoint saves, so that
        every expert is saved once and can be loaded into another layout (each expert tensor, weights and
        per-expert optimizer state, as the expert sharding saves it). Copies the per-parameter dicts: the
        optimizer's ``state_dict`` shares them with the live optimizer."""
        if self.model_parallel is not None:
            return self.model_parallel.to_checkpoint(model, state, self.gather_experts)
        return _map_expert_state(model, state, self.experts.to_saved)

    def from_checkpoint(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """Undo :meth:`to_checkpoint` on loaded tensors: this rank's rows of every expert tensor."""
        if self.model_parallel is not None:
            return self.model_parallel.from_checkpoint(model, state, self.experts.local)
        return _map_expert_state(model, state, self.experts.from_saved)

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-able state beyond the tensors that a resumed run needs (FSSDP owners and load windows)."""
        return self.experts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experts.load_state_dict(state)

    def step_metrics(self) -> dict[str, Any]:
        """What the last step moved and waited for, per collective (this rank), and under FSSDP the replicas per
        layer and the spread of expert rows over ranks (max / mean; 1.0 is balanced). Collective over dp."""
        now = self.stats.snapshot()
        moved = delta(now, self._last_stats)
        self._last_stats = now
        out: dict[str, Any] = {
            "comm": {
                name: {"bytes": s.bytes_sent + s.bytes_received, "wait_s": s.wait_s}
                for name, s in sorted(moved.items())
                if s.calls
            }
        }
        out.update(self.experts.metrics())
        return out

    def barrier(self) -> None:
        if self.dp is not None:
            import torch.distributed as dist

            dist.barrier()


def check_layout(
    cfg: ParallelConfig, world: int, num_experts: int, n_layers: int, n_heads: int, fssdp: FssdpConfig | None = None
) -> ParallelDims:
    """The validated degrees; layouts this version cannot run yet are refused, naming the field."""
    dims = ParallelDims.from_config(cfg, world, num_experts, n_layers, n_heads)
    if fssdp is not None and fssdp.enabled:
        if dims.ep > 1:
            raise LayoutError(
                f"fssdp.policy={fssdp.policy} places the experts itself over the data-parallel ranks; "
                f"leave parallel.ep=1 (got {dims.ep})"
            )
        if num_experts % (dims.dp * dims.tp):
            raise LayoutError(
                f"fssdp.policy={fssdp.policy}: moe.num_experts={num_experts} must be divisible by the "
                f"{dims.dp * dims.tp} ranks of a pipeline stage (dp x tp) that own them"
            )
        if dims.etp > 1:
            raise LayoutError(
                f"fssdp.policy={fssdp.policy} materializes whole experts; it cannot be combined with "
                f"expert tensor parallelism (parallel.etp={dims.etp}): set parallel.etp=1"
            )
    stages = dims.pp * cfg.pp_virtual
    if cfg.pp_virtual > 1 and dims.pp == 1:
        raise LayoutError(
            f"parallel.pp_virtual={cfg.pp_virtual} interleaves stages over pipeline ranks: it needs parallel.pp > 1"
        )
    if n_layers < stages:
        raise LayoutError(
            f"parallel.pp={dims.pp} x parallel.pp_virtual={cfg.pp_virtual} = {stages} stages need "
            f"model.n_layers >= {stages}, got {n_layers}"
        )
    if cfg.pp_stage_blocks and (len(cfg.pp_stage_blocks) != stages or sum(cfg.pp_stage_blocks) != n_layers):
        raise LayoutError(
            f"parallel.pp_stage_blocks={list(cfg.pp_stage_blocks)} must give the blocks of each of the "
            f"{stages} stages (parallel.pp x parallel.pp_virtual), summing to model.n_layers={n_layers}"
        )
    return dims


def observed(
    inner: Transport, mesh, dim: str, world: int, network: SimulatedNetwork | None, timeline: Timeline | None
) -> Transport:
    """``inner`` behind the simulated network and/or the timeline, when either is asked for."""
    if network is None and timeline is None:
        return inner
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(mesh.get_group(dim))
    return SimulatedNetworkTransport(
        inner, network, [network.node_of(r, world) if network else 0 for r in ranks], timeline
    )


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, expert parameters): experts are split over ep, everything else is replicated."""
    expert_ids = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    experts = [p for p in model.parameters() if id(p) in expert_ids]
    return dense, experts


def expert_state_names(model: nn.Module) -> list[str]:
    """State-dict names of the expert weights (split over ep along dim 0)."""
    expert_ids = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in expert_ids]


def _map_expert_state(model: nn.Module, state: dict[str, Any], convert) -> dict[str, Any]:
    """``convert(name, tensor)`` applied to every expert weight and to its non-scalar optimizer state."""
    model_sd, optim_state = dict(state["model"]), dict(state["optim"]["state"])
    for name in expert_state_names(model):
        model_sd[name] = convert(name, model_sd[name])
        if name in optim_state:
            optim_state[name] = {k: convert(name, v) if v.dim() > 0 else v for k, v in optim_state[name].items()}
    return {"model": model_sd, "optim": {**state["optim"], "state": optim_state}}
