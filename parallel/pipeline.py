"""Pipeline parallelism: the blocks split into stages, micro-batches driven through them by
``torch.distributed.pipelining`` - ``Schedule1F1B`` with one stage per rank, ``ScheduleInterleaved1F1B`` with
``parallel.pp_virtual`` stages per rank (stage s lives on pipeline rank s mod pp).

torch's schedules fit here as they are (they run on gloo: batched isend/irecv over the pipeline group), so
only what they do not know is ours:
- splitting: contiguous blocks per stage, balanced by cost (:func:`stage_blocks`: the active parameters a token
  meets in each block, plus the LM head on the last stage); the embedding sits on the first stage.
- a stage is a view of the model (:func:`stage_view`): the same model with only its blocks and the
  embedding / head where they belong, sharing the modules and their parameter names with the rank's model
  (which parts these are, the model's adapter says: :mod:`hecate.parallel.model_adapter`).
- router losses: the schedule's loss function sees only the last stage's logits, so every MoE layer adds its
  scaled aux and z losses to the backward of its own stage (:class:`_RouterLossGrad`: identity forward; in
  backward the losses receive the gradient 1, as the summed loss of the reference gives them; the schedule's
  division by the number of micro-batches then applies to them as to the LM loss). Their values, the per-layer
  loads and the dropped pairs are recorded per micro-batch and summed over stages once per step.

Evaluation runs the stages forward in order with plain send/recv (:meth:`Pipeline.forward`).

Shapes: B rows of a micro-batch on this data-parallel rank, b = rows held by a stage's activations (B / tp),
S sequence, D model dim, E experts, L blocks.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from hecate.parallel.errors import LayoutError
from hecate.parallel.model_adapter import ModelAdapter
from hecate.parallel.moe import MoE


def block_costs(model: nn.Module, adapter: ModelAdapter) -> list[float]:
    """Per block, the parameters one token goes through (attention, norms, router, top_k of E experts)."""
    costs = []
    for block in adapter.block_dict(model).values():
        total = sum(p.numel() for p in block.parameters())
        ffn = getattr(block, adapter.ffn)
        if isinstance(ffn, MoE):
            experts = sum(p.numel() for p in ffn.experts.parameters())
            total -= experts * (1 - ffn.cfg.top_k / ffn.cfg.num_experts)
        costs.append(float(total))
    return costs


def stage_blocks(costs: list[float], stages: int, head_cost: float = 0.0) -> list[list[int]]:
    """Contiguous, non-empty block ranges per stage that minimise the largest stage cost (the head's cost counts
    on the last stage). Exact, by dynamic programming over split points."""
    n = len(costs)
    if n < stages:
        raise LayoutError(f"{stages} pipeline stages need at least {stages} blocks (model.n_layers={n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][i]: first i blocks in s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            extra = head_cost if s == stages else 0.0
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    bounds, i = [], n
    for s in range(stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(a, b)) for a, b in reversed(bounds)]


def split_stages(model: nn.Module, adapter: ModelAdapter, stages: int, sizes: list[int]) -> list[list[int]]:
    """Blocks of each stage: ``sizes`` contiguous blocks per stage when given (``parallel.pp_stage_blocks``),
    else balanced by cost (:func:`stage_blocks`)."""
    if sizes:
        starts = list(itertools.accumulate(sizes, initial=0))
        return [list(range(start, start + n)) for start, n in zip(starts, sizes)]
    head_cost = float(getattr(model, adapter.head).weight.numel())
    return stage_blocks(block_costs(model, adapter), stages, head_cost=head_cost)


class TiedHead(nn.Embedding):
    """The LM head of a last stage that does not hold the embedding it is tied to: a copy of the embedding table
    (kept equal by summing both copies' gradients) that computes x_BSD @ weight.T. An Embedding, so that the
    optimizer gives it the embedding's decay group, as one process does."""

    def __init__(self, weight_VD: torch.Tensor):
        super().__init__(*weight_VD.shape, _weight=weight_VD)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSD, self.weight)


def keep_stages(
    model: nn.Module, adapter: ModelAdapter, blocks: list[int], first: bool, last: bool, tied: bool
) -> None:
    """Prune the rank's model in place to what its stages hold (parameter names unchanged)."""
    tied_copy = (
        TiedHead(getattr(model, adapter.embedding).weight.detach().clone()) if last and not first and tied else None
    )
    _select(model, model, adapter, blocks, first, last)
    if tied_copy is not None:
        setattr(model, adapter.head, tied_copy)


def stage_view(model: nn.Module, adapter: ModelAdapter, blocks: list[int], first: bool, last: bool) -> nn.Module:
    """The model of one stage: a shallow copy that shares the model's modules and keeps only its own."""
    view = copy.copy(model)
    view._modules = dict(model._modules)  # the copy's own table of children; the children are shared
    _select(view, model, adapter, blocks, first, last)
    return view


def _select(
    target: nn.Module, model: nn.Module, adapter: ModelAdapter, blocks: list[int], first: bool, last: bool
) -> None:
    """Set ``target``'s blocks to ``blocks`` of ``model``, and its ends to ``model``'s where the stages hold them."""
    setattr(target, adapter.blocks, nn.ModuleDict({str(i): adapter.block_dict(model)[str(i)] for i in blocks}))
    setattr(target, adapter.embedding, getattr(model, adapter.embedding) if first else None)
    for end in (adapter.final_norm, adapter.head):
        setattr(target, end, getattr(model, end) if last else None)


class _RouterLossGrad(torch.autograd.Function):
    """x passes through; in backward the router loss (already scaled by its coefficient) gets gradient 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, router_loss: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


@dataclass
class MicroBatch:
    """What one step feeds the pipeline. Stages are given their input and output shapes from it, so that torch
    does not infer them by running a stage's forward on uninitialised inputs (which would also run the MoE
    layers' collectives and record router losses of garbage)."""

    count: int  # micro-batches per step
    rows: int  # B, on this data-parallel rank
    seq_len: int
    logits_dtype: torch.dtype = torch.float32  # bf16 under autocast


@dataclass
class PipelineLosses:
    """One step's values, summed over stages: the same on every rank of a pipeline."""

    lm_loss: float  # mean over micro-batches of the LM loss
    aux_loss: float  # mean over micro-batches of the sum over MoE layers (unscaled)
    z_loss: float
    dropped: int
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> tokens per expert, summed


class Pipeline:
    """This rank's stages of the model and the schedule that runs them (built by :meth:`Parallel.apply`)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        split: list[list[int]],
        group: dist.ProcessGroup,
        micro: MicroBatch,
        shape: tuple[int, int, int],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        moe_blocks: list[int],
        num_experts: int,
    ):
        """``shape`` is (rows a stage's activations hold, model dim, vocabulary columns of the logits)."""
        self.group = group
        self.device = next(model.parameters()).device
        self.pp, self.pp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.split, self.moe_blocks, self.micro_batches = split, moe_blocks, micro.count
        self.num_experts = num_experts
        self.num_stages = len(split)
        self.mine = [s for s in range(self.num_stages) if s % self.pp == self.pp_rank]
        self.chunks = {s: stage_view(model, adapter, split[s], s == 0, s == self.num_stages - 1) for s in self.mine}
        rows, dim, vocab = shape
        activations = torch.empty(rows, micro.seq_len, dim, device="meta", requires_grad=True)
        tokens = torch.empty(micro.rows, micro.seq_len, dtype=torch.long, device="meta")
        logits = torch.empty(
            micro.rows, micro.seq_len, vocab, dtype=micro.logits_dtype, device="meta", requires_grad=True
        )
        stages = [
            PipelineStage(
                self.chunks[s],
                s,
                self.num_stages,
                self.device,  # where the stage allocates its receive buffers
                group=group,
                input_args=tokens if s == 0 else activations,
                output_args=logits if s == self.num_stages - 1 else activations,
            )
            for s in self.mine
        ]
        self.stages = stages
        if len(stages) == 1:
            self.schedule = Schedule1F1B(stages[0], micro.count, loss_fn=loss_fn)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, micro.count, loss_fn=loss_fn)
        self.is_last = self.num_stages - 1 in self.mine
        self.moe_layers = adapter.moe_layers(model)
        self._record: dict[str, torch.Tensor] = {}
        for index, layer in self.moe_layers.items():
            layer.register_forward_hook(lambda mod, _args, out, index=index: self._after_moe(index, mod, out))

    def _after_moe(self, index: int, layer: MoE, out: torch.Tensor) -> torch.Tensor:
        if not (layer.training and torch.is_grad_enabled()):
            return out
        stats, cfg = layer.stats, layer.cfg
        self._record["aux"] += stats.aux_loss.detach().double()
        self._record["z"] += stats.z_loss.detach().double()
        self._record["dropped"] += stats.dropped
        self._record["counts"][self.moe_blocks.index(index)] += stats.counts_E
        return _RouterLossGrad.apply(out, cfg.aux_loss_coef * stats.aux_loss + cfg.z_loss_coef * stats.z_loss)

    def step(self, inputs_BS: torch.Tensor, targets_BS: torch.Tensor) -> PipelineLosses:
        """Forward and backward of all micro-batches (the rows of ``inputs_BS``, in order); gradients are those
        of the mean loss over micro-batches. Collective over the pipeline group."""
        sums = {"dtype": torch.float64, "device": self.device}
        self._record = {
            "aux": torch.zeros((), **sums),
            "z": torch.zeros((), **sums),
            "dropped": torch.zeros((), **sums),
            "counts": torch.zeros(len(self.moe_blocks), self.num_experts, **sums),
        }
        lm_losses: list[torch.Tensor] = []
        self.schedule.step(inputs_BS, target=targets_BS, losses=lm_losses)
        lm = (
            torch.stack([loss.detach().double() for loss in lm_losses]).sum()
            if self.is_last
            else torch.zeros((), **sums)
        )
        packed = torch.cat(
            [
                torch.stack([lm, self._record["aux"], self._record["z"], self._record["dropped"]]),
                self._record["counts"].flatten(),
            ]
        )
        dist.all_reduce(packed, group=self.group)  # every stage contributes its own layers (and the last the LM)
        lm, aux, z, dropped = (packed[:4] / torch.tensor([self.micro_batches] * 3 + [1], **sums)).tolist()
        counts_LE = packed[4:].view(len(self.moe_blocks), -1).long()
        counts = {block: counts_LE[i] for i, block in enumerate(self.moe_blocks)}
        return PipelineLosses(lm_loss=lm, aux_loss=aux, z_loss=z, dropped=int(dropped), counts=counts)

    @torch.no_grad()
    def forward(self, tokens_BS: torch.Tensor, activation_shape: tuple[int, ...]) -> torch.Tensor | None:
        """Forward only, stage after stage: the logits on the rank of the last stage, None elsewhere."""
        x = tokens_BS
        for s in self.mine:
            if s > 0:
                x = torch.empty(activation_shape, device=self.device)
                dist.recv(x, group=self.group, group_src=(s - 1) % self.pp)
            x = self.chunks[s](x)
            if s < self.num_stages - 1:
                dist.send(x.contiguous(), group=self.group, group_dst=(s + 1) % self.pp)
        return x if self.is_last else None


def bubble_fraction(pp: int, virtual: int, micro_batches: int) -> float:
    """The schedule's idle share of a step in theory (equal stage times, no communication): 1F1B idles
    (pp - 1) stage-slots per rank out of m + pp - 1; interleaving v stages per rank shrinks the slots to 1 / v."""
    idle = (pp - 1) / virtual
    return idle / (micro_batches + idle)
