"""Tensor, expert-tensor and pipeline parallelism of one run, folded over the ranks that data and expert
parallelism already use: the groups they need, what they change in a built model, and the
gradient bookkeeping that follows. :class:`~hecate.parallel.parallelize.Parallel` holds one and asks it at the
points where a layout with tp, pp or etp > 1 differs from DP x EP.

Folding, per pipeline stage: attention, dense FFNs, embedding and head are split over ``tp`` (replicated over
``dp``); the MoE layers see the dp x tp ranks of the stage as one token-parallel group (each rank holds its own
rows: sequence parallelism) that is regrouped as edp x ep x etp for the experts. So the MoE layer's router sums
are reduced over the whole stage, and FSSDP runs over the stage's ranks too.

Gradients, after the last backward of a step (each divided by dp, the ranks that split the global batch):
- tp-split weights: all-reduced over dp (every tp rank already holds the exact gradient of its shard);
- replicated weights (norms, routers, shared experts): each tp rank saw only its rows, so all-reduced over the
  stage (dp x tp);
- experts: over edp (none under FSSDP: owners hold the sum);
- the tied embedding, held by the first and the last stage: summed over those two after the above.
The global norm counts every weight once: each rank's squared norms divided by the number of ranks holding the
same values, summed over the world.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hecate.collectives import CommStats, TorchTransport, Transport
from hecate.parallel.config import ParallelConfig
from hecate.parallel.data_parallel import GradientAverager, router_sums_reduce
from hecate.parallel.errors import LayoutError
from hecate.parallel.model_adapter import ModelAdapter
from hecate.parallel.moe import MoE
from hecate.parallel.moe.expert_tensor_parallel import HIDDEN_DIM, ExpertTensorParallel
from hecate.parallel.moe.losses import Reduce, RouterSums
from hecate.parallel.pipeline import MicroBatch, Pipeline, keep_stages, split_stages
from hecate.parallel.tensor_parallel import (
    check_tensor_parallel,
    parallelize_embeddings,
    parallelize_ffn,
    scale_grad,
    split_for,
    unsplit,
    vocab_parallel_cross_entropy,
)
from hecate.parallel.topology import Meshes, ParallelDims


def _subgroup(rank_lists: list[list[int]], stats: CommStats, device_type: str) -> TorchTransport:
    """This rank's group among ``rank_lists`` (every rank creates all of them, in the same order)."""
    mine, _ = dist.new_subgroups_by_enumeration(rank_lists)
    return TorchTransport(mine, stats, device_type)


@dataclasses.dataclass
class ModelParallel:
    """This rank's tensor / expert-tensor / pipeline groups and what they split; None groups are degree 1."""

    dims: ParallelDims
    virtual: int  # pipeline stages per pipeline rank
    stage_sizes: list[int]  # blocks per stage as configured (parallel.pp_stage_blocks); empty = balanced by cost
    stats: CommStats
    tp: Transport | None = None
    etp: Transport | None = None
    stage: Transport | None = None  # the dp x tp ranks of this pipeline stage, in token order
    pp_group: dist.ProcessGroup | None = None
    world: Transport | None = None
    tied: Transport | None = None  # first and last stage's holders of the tied embedding
    pipeline: Pipeline | None = None
    tp_split: dict[str, str] = dataclasses.field(default_factory=dict)  # parameter name -> how (unsplit)
    tp_alias: dict[str, str] = dataclasses.field(default_factory=dict)  # tied name (lm_head.weight) -> its split name
    vocab_start: int = 0
    stage_split: list[list[int]] = dataclasses.field(default_factory=list)  # blocks of each pipeline stage
    moe_blocks: list[int] = dataclasses.field(default_factory=list)
    num_experts: int = 0
    adapter: ModelAdapter | None = None  # where the model's parts are (set by split_model)
    tied_embeddings: bool = False  # the whole model's head shares the embedding's weight
    vocab_size: int = 0
    dim: int = 0
    device_type: str = "cpu"  # of the meshes: where the groups' tensors live

    @classmethod
    def build(
        cls, dims: ParallelDims, meshes: Meshes, cfg: ParallelConfig, dp: Transport, stats: CommStats
    ) -> ModelParallel:
        """The groups (collective: every rank calls this in the same order)."""
        device_type = meshes.dense.device_type
        out = cls(
            dims,
            cfg.pp_virtual,
            list(cfg.pp_stage_blocks),
            stats,
            world=TorchTransport(None, stats, device_type),
            stage=dp,
            device_type=device_type,
        )
        if dims.tp > 1:
            out.tp = TorchTransport.from_mesh(meshes.dense, "tp", stats)
            out.stage = _subgroup(
                [list(range(p * dims.world // dims.pp, (p + 1) * dims.world // dims.pp)) for p in range(dims.pp)],
                stats,
                device_type,
            )
        if dims.etp > 1:
            out.etp = TorchTransport.from_mesh(meshes.moe, "etp", stats)
        if dims.pp > 1:
            out.pp_group = meshes.dense.get_group("pp")
        return out

    # ---- what changes in the model (before EP and FSSDP see it) --------------------------------

    def split_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """Keep this rank's pipeline stages, then split attention, dense FFNs and embeddings over tp."""
        dims = self.dims
        moe = adapter.moe_layers(model)
        self.adapter, self.tied_embeddings = adapter, adapter.tied(model)
        self.vocab_size, self.dim = adapter.dims(model)
        self.moe_blocks = sorted(moe)  # of the whole model: every stage reports every layer's load
        self.num_experts = next(iter(moe.values())).cfg.num_experts if moe else 0
        if dims.pp > 1:
            self.stage_split = split_stages(model, adapter, dims.pp * self.virtual, self.stage_sizes)
            mine = [s for s in range(len(self.stage_split)) if s % dims.pp == self.pp_rank]
            keep_stages(
                model,
                adapter,
                [b for s in mine for b in self.stage_split[s]],
                first=0 in mine,
                last=len(self.stage_split) - 1 in mine,
                tied=self.tied_embeddings,
            )
            if self.tied_embeddings:
                grid = dims.dense_grid()
                self.tied = _subgroup(
                    [[int(grid[0, d, t]), int(grid[-1, d, t])] for d in range(dims.dp) for t in range(dims.tp)],
                    self.stats,
                    self.device_type,
                )
        if dims.tp > 1:
            blocks = adapter.block_dict(model).values()
            dense = [getattr(b, adapter.ffn) for b in blocks if not isinstance(getattr(b, adapter.ffn), MoE)]
            check_tensor_parallel(dims.tp, self.vocab_size, dense[0].w1.shape[1] if dense else 0)
            split = parallelize_embeddings(model, adapter, self.tp, self.vocab_size, self.tied_embeddings)
            for block in blocks:
                split |= adapter.split_attention(getattr(block, adapter.attention), self.tp)
            for ffn in dense:
                split |= parallelize_ffn(ffn, self.tp)
            names = {id(p): n for n, p in model.named_parameters()}
            self.tp_split = {names[id(p)]: how for p, how in split.items() if id(p) in names}
            self.tp_alias = {
                n: names[id(p)]
                for n, p in model.named_parameters(remove_duplicate=False)
                if names.get(id(p), n) != n and names[id(p)] in self.tp_split
            }
            self.vocab_start = self.tp.rank * (model.vocab_size // dims.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group) if self.pp_group is not None else 0

    def router_reduce(self) -> Reduce:
        """Router sums over the stage's dp x tp ranks. Every tp rank's loss holds the same router losses, while
        the all-reduce's backward sums over all of them: the gradient is scaled by 1 / tp so that it counts once
        per data-parallel rank, as under plain DP."""
        base, scale = router_sums_reduce(self.stage), 1.0 / self.dims.tp
        if self.dims.tp == 1:
            return base

        def reduce(sums: RouterSums) -> RouterSums:
            return base(
                dataclasses.replace(
                    sums, prob_sum_E=scale_grad(sums.prob_sum_E, scale), lse_sq_sum=scale_grad(sums.lse_sq_sum, scale)
                )
            )

        return reduce

    def split_experts(self, layer: MoE) -> None:
        """Expert tensor parallelism: the local experts' F split over etp (after EP kept the local experts)."""
        if self.etp is not None:
            if layer.cfg.ffn_dim % self.dims.etp:
                raise LayoutError(f"parallel.etp={self.dims.etp} must divide moe.ffn_dim={layer.cfg.ffn_dim}")
            layer.experts = ExpertTensorParallel(layer.experts, self.etp)

    def build_pipeline(
        self, model: nn.Module, micro: MicroBatch | None, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        if self.dims.pp > 1:
            if micro is None:
                raise ValueError("pipeline parallelism needs the step's micro-batch shape (Parallel.apply(micro=))")
            shape = (micro.rows // self.dims.tp, self.dim, self.vocab_size // self.dims.tp)
            self.pipeline = Pipeline(
                model,
                self.adapter,
                self.stage_split,
                self.pp_group,
                micro,
                shape,
                loss_fn,
                self.moe_blocks,
                self.num_experts,
            )

    # ---- gradients -----------------------------------------------------------------------------

    def averager(
        self,
        model: nn.Module,
        experts: list[nn.Parameter],
        dp: Transport,
        expert_dp: Transport | None,
        reduce_dtype: torch.dtype = torch.float32,
    ) -> Callable[[], None]:
        """What averages the gradients after the last backward of a step (see the module docstring); the
        all-reduces carry ``reduce_dtype``."""
        names = dict(model.named_parameters())
        expert_ids = {id(p) for p in experts}
        split = [names[n] for n in self.tp_split]
        replicated = [p for n, p in names.items() if id(p) not in expert_ids and n not in self.tp_split]
        by_groups = [
            GradientAverager(split, experts, dp, expert_dp, self.dims.dp, reduce_dtype),
            GradientAverager(replicated, [], self.stage, None, self.dims.dp, reduce_dtype),
        ]
        tied = None
        if self.tied is not None:
            holder = getattr(model, self.adapter.embedding) or getattr(model, self.adapter.head)
            tied = holder.weight

        def average() -> None:
            for averager in by_groups:
                averager()
            if tied is not None:  # both stages then step identically
                self.tied.all_reduce(tied.grad, name="grad.tied_embedding").wait()

        return average

    def grad_norm(self, model: nn.Module, experts: list[nn.Parameter], expert_copies: int) -> torch.Tensor:
        """L2 norm (fp64) of the whole model's gradient, every weight counted once."""
        dims = self.dims
        expert_ids = {id(p) for p in experts}
        split = set(self.tp_split)
        squared = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            if p.grad is None or self._is_tied_copy(model, name):
                continue
            copies = expert_copies if id(p) in expert_ids else dims.dp if name in split else dims.dp * dims.tp
            squared += p.grad.detach().double().square().sum() / copies
        return self.world.all_reduce(squared, name="grad.norm").wait().sqrt()

    def _is_tied_copy(self, model: nn.Module, name: str) -> bool:
        """The last stage's copy of the tied embedding (the first stage's counts)."""
        adapter = self.adapter
        return (
            self.tied is not None and name == adapter.head_weight_name() and getattr(model, adapter.embedding) is None
        )

    # ---- loss and whole-model views ------------------------------------------------------------

    def cross_entropy(self, logits_NV: torch.Tensor, targets_N: torch.Tensor, reduction: str) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits_NV, targets_N, self.tp, self.vocab_start, reduction)

    def gather_shards(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], gather_experts: Callable[[nn.Module, dict], dict]
    ) -> dict[str, torch.Tensor]:
        """This stage's parameter-shaped tensors by name, whole: etp shards, then ep (``gather_experts``), then tp
        shards joined. Collective over the stage."""
        full = {name: t.detach().clone() for name, t in tensors.items()}
        if self.etp is not None:
            for name in full:
                if _expert_weight(name):
                    shards = self._all_gather(full[name], self.etp)
                    full[name] = torch.cat(shards.unbind(0), dim=HIDDEN_DIM[_expert_weight(name)])
        full = gather_experts(model, full)
        for name in full:
            if how := self._tp_how(name):
                full[name] = unsplit(self._all_gather(full[name], self.tp), how)
        return full

    def _tp_how(self, name: str) -> str | None:
        """How ``name`` is split over tp (its tied alias's split for ``lm_head.weight``), or None."""
        return self.tp_split.get(self.tp_alias.get(name, name))

    def local(
        self, name: str, full: torch.Tensor, local_experts: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Undo :meth:`gather_shards` for one tensor: this rank's shard (``local_experts`` picks its experts)."""
        if how := self._tp_how(name):
            full = split_for(full, how, self.tp.rank, self.dims.tp)
        if _expert_weight(name):
            full = local_experts(name, full)
            if self.etp is not None:
                full = full.chunk(self.dims.etp, dim=HIDDEN_DIM[_expert_weight(name)])[self.etp.rank]
        return full.clone()

    def to_checkpoint(
        self, model: nn.Module, state: dict[str, Any], gather_experts: Callable[[nn.Module, dict], dict]
    ) -> dict[str, Any]:
        """A ``get_state_dict`` pair with every split tensor (weights and per-parameter optimizer state) whole, so
        that it is saved once and loads into any layout; under pp each stage saves its own names. Collective over the
        stage."""
        names = [n for n in state["model"] if self._tp_how(n) or _expert_weight(n)]
        model_sd = {
            **state["model"],
            **self.gather_shards(model, {n: state["model"][n] for n in names}, gather_experts),
        }
        optim_state = {name: dict(values) for name, values in state["optim"]["state"].items()}
        # every per-parameter state tensor (AdamW's moments, or whatever the optimizer keeps); scalars stay as they are
        keys = sorted({k for n in names for k, v in optim_state.get(n, {}).items() if torch.is_tensor(v) and v.dim()})
        for key in keys:
            moments = {n: optim_state[n][key] for n in names if key in optim_state.get(n, {})}
            for name, whole in self.gather_shards(model, moments, gather_experts).items():
                optim_state[name][key] = whole
        groups = [dict(group) for group in state["optim"]["param_groups"]]
        if self.pp_group is not None:
            self._rename_tied_copy(
                model, optim_state, groups, self.adapter.head_weight_name(), self.adapter.embedding_weight_name()
            )
            stages: list[list[list[str]]] = [None] * self.dims.pp
            dist.all_gather_object(stages, [group["params"] for group in groups], group=self.pp_group)
            for i, group in enumerate(groups):  # every stage saves the same (whole-model) groups
                group["params"] = list(dict.fromkeys(fqn for stage in stages for fqn in stage[i]))
        return {"model": model_sd, "optim": {**state["optim"], "state": optim_state, "param_groups": groups}}

    def _rename_tied_copy(self, model: nn.Module, optim_state: dict, groups: list[dict], old: str, new: str) -> None:
        """The last stage's copy of the tied embedding is saved under the embedding's name (the first stage saves
        the same values): one process holds one optimizer state for the tied pair."""
        if not self._is_tied_copy(model, self.adapter.head_weight_name()):
            return
        if old in optim_state:
            optim_state[new] = optim_state.pop(old)
        for group in groups:
            group["params"] = [new if fqn == old else fqn for fqn in group["params"]]

    def from_checkpoint(
        self, model: nn.Module, state: dict[str, Any], local_experts: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> dict[str, Any]:
        """Undo :meth:`to_checkpoint` on loaded tensors."""
        model_sd = {
            n: self.local(n, t, local_experts) if self._tp_how(n) or _expert_weight(n) else t
            for n, t in state["model"].items()
        }
        optim_state = {
            name: {
                k: self.local(name, v, local_experts)
                if v.dim() > 0 and (self._tp_how(name) or _expert_weight(name))
                else v
                for k, v in values.items()
            }
            for name, values in state["optim"]["state"].items()
        }
        groups = [dict(group) for group in state["optim"]["param_groups"]]
        if self.pp_group is not None:
            head, embedding = self.adapter.head_weight_name(), self.adapter.embedding_weight_name()
            mine = {embedding if self._is_tied_copy(model, n) else n for n, _ in model.named_parameters()}
            for group in groups:
                group["params"] = [fqn for fqn in group["params"] if fqn in mine]
            self._rename_tied_copy(model, optim_state, groups, embedding, head)
        return {"model": model_sd, "optim": {**state["optim"], "state": optim_state, "param_groups": groups}}

    def gather_full(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], gather_experts: Callable[[nn.Module, dict], dict]
    ) -> dict[str, torch.Tensor]:
        """Parameter-shaped tensors by name as one process holds the whole model: :meth:`gather_shards`, then
        every pipeline stage's names merged. Collective over the world."""
        full = self.gather_shards(model, tensors, gather_experts)
        if self.pp_group is not None:
            stages: list[dict] = [None] * self.dims.pp
            dist.all_gather_object(stages, full, group=self.pp_group)
            full = {name: t for stage in stages for name, t in stage.items()}
        if self.tied_embeddings:
            full.pop(self.adapter.head_weight_name(), None)
        return full

    @staticmethod
    def _all_gather(local: torch.Tensor, transport: Transport) -> torch.Tensor:
        """[ranks, *local.shape]: every rank's ``local``."""
        out = local.new_empty((transport.world_size * local.shape[0], *local.shape[1:]))
        return transport.all_gather(out, local.contiguous(), name="gather_full").wait().view(-1, *local.shape)


def _expert_weight(name: str) -> str | None:
    """``w1`` / ``w2`` / ``w3`` when ``name`` is an expert weight (e.g. ``blocks.1.ffn.experts.w1``), else None."""
    prefix, _, weight = name.rpartition(".")
    return weight if prefix.endswith(".experts") and weight in HIDDEN_DIM else None
