"""Tensor parallelism (Megatron-LM style) with sequence parallelism in the norm regions, a vocabulary-parallel
embedding and a vocabulary-parallel cross-entropy, applied to a built model from outside.

Layout over the ``tp`` ranks of a data-parallel rank (which all load the same micro-batch rows):
- residual stream, norms, router and MoE layer ("sequence-parallel region"): each rank holds 1/tp of the
  micro-batch's rows, ``x_bSD`` with b = B / tp, contiguous in token order (rank t holds rows [t b, (t+1) b)).
  The split is over rows, not positions, so that the MoE layer's tokens on the ranks of a stage are in the
  single-process token order: capacity dropping and the router-sum reduce then see exactly the reference.
- attention: the input is all-gathered (backward: reduce-scatter), q/k/v are column-parallel by heads (each rank
  computes H / tp whole heads), the output projection is row-parallel and its partial sums are reduce-scattered
  back to the row shards (backward: all-gather). The dense FFN of non-MoE blocks is split the same way over its
  hidden size.
- embedding: each rank holds V / tp rows of the table and looks up the tokens in its range; the partial sums are
  reduce-scattered into the row shards. The LM head is column-parallel over the vocabulary (tied to the same
  shard when the embeddings are tied); the logits stay split, ``logits_BSv``, and the cross-entropy is computed
  from three small all-reduces (max, sum of exp, target logit) without ever gathering them (Megatron's
  vocab-parallel cross-entropy).

Why our own and not ``torch.distributed.tensor.parallel`` (``parallelize_module``, ``loss_parallel``): those
wrap parameters as DTensors. The rest of the trainer works on plain local tensors - flat-bucket gradient
all-reduces, the fp64 global gradient norm, the expert parallel token exchange, the FSSDP engine's chunks and
the checkpoint conversion - and a DTensor gradient cannot enter those without a conversion at every step. The
fused ``qkv`` projection also needs a head-aware row split (H / tp query heads, Hkv / tp key and value heads),
which ColwiseParallel's even ``Shard(0)`` does not give; and ``loss_parallel`` needs DTensor logits. The math here
is the same as those APIs' (and Megatron's): a handful of autograd-aware collectives below, each with the
conjugate collective in backward.

Shapes: B micro-batch rows on this data-parallel rank, b = B / tp rows held in the sequence-parallel region,
S sequence, D model dim, H heads, Dh head dim, F FFN hidden dim, V vocabulary, v = V / tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hecate.collectives import Transport
from hecate.parallel.errors import LayoutError
from hecate.parallel.model_adapter import ModelAdapter

# ---- autograd-aware collectives over the tp group ---------------------------------------------------


class _RowExchange(torch.autograd.Function):
    """One row exchange and its adjoint: all-gather rows (x_bSD -> x_BSD) is undone in backward by reduce-scattering
    the gradient's rows, and reduce-scatter of partial sums (x_BSD -> x_bSD) by all-gathering them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: Transport, gather: bool, name: str) -> torch.Tensor:
        ctx.tp, ctx.gather, ctx.name = tp, gather, name
        return (_all_gather_rows if gather else _reduce_scatter_rows)(x, tp, name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        adjoint = _reduce_scatter_rows if ctx.gather else _all_gather_rows
        return adjoint(grad, ctx.tp, f"{ctx.name}.backward"), None, None, None


class _SumReplicated(torch.autograd.Function):
    """Sum over ranks of partial values that every rank then uses identically (the output is replicated, so each
    rank's backward already carries the whole gradient: identity)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: Transport, name: str) -> torch.Tensor:
        return tp.all_reduce(x.detach().clone().contiguous(), name=name).wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _all_gather_rows(x: torch.Tensor, tp: Transport, name: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * tp.world_size, *x.shape[1:]))
    return tp.all_gather(out, x.contiguous(), name=name).wait()


def _reduce_scatter_rows(x: torch.Tensor, tp: Transport, name: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // tp.world_size, *x.shape[1:]))
    return tp.reduce_scatter(out, x.contiguous(), name=name).wait()


def gather_rows(x: torch.Tensor, tp: Transport) -> torch.Tensor:
    return _RowExchange.apply(x, tp, True, "tp.gather")


def reduce_scatter_rows(x: torch.Tensor, tp: Transport) -> torch.Tensor:
    return _RowExchange.apply(x, tp, False, "tp.reduce_scatter")


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, scale)


# ---- the model's pieces ---------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Embedding):
    """tokens_BS -> x_bSD. Holds rows [start, start + v) of the table as ``weight`` (the parameter name stays
    ``tok_emb.weight``; an Embedding, so that the optimizer puts it in the embedding's decay group)."""

    def __init__(self, weight_vD: torch.Tensor, start: int, tp: Transport):
        super().__init__(*weight_vD.shape, _weight=weight_vD)
        self.start, self.tp = start, tp

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        local_BS = tokens_BS - self.start
        mine_BS = (local_BS >= 0) & (local_BS < self.weight.shape[0])
        x_BSD = F.embedding(local_BS.where(mine_BS, 0), self.weight) * mine_BS.unsqueeze(-1)
        return reduce_scatter_rows(x_BSD, self.tp)


def vocab_parallel_cross_entropy(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, tp: Transport, start: int, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits split over the vocabulary (this rank holds columns [start, start + v)), equal on
    every rank. fp32, as ``F.cross_entropy`` on the gathered logits would be."""
    logits_NV = logits_NV.float()
    with torch.no_grad():
        max_N = logits_NV.max(dim=-1).values
        tp.all_reduce(max_N, reduce="max", name="tp.loss_max").wait()
    shifted_NV = logits_NV - max_N.unsqueeze(-1)
    sum_exp_N = _SumReplicated.apply(shifted_NV.exp().sum(dim=-1), tp, "tp.loss_sum_exp")
    local_N = targets_N - start
    mine_N = (local_N >= 0) & (local_N < logits_NV.shape[-1])
    target_N = shifted_NV.gather(-1, local_N.where(mine_N, 0).unsqueeze(-1)).squeeze(-1) * mine_N
    target_N = _SumReplicated.apply(target_N, tp, "tp.loss_target")
    loss_N = sum_exp_N.log() - target_N
    return loss_N.sum() if reduction == "sum" else loss_N.mean()


def _shard(weight: torch.Tensor, dim: int, rank: int, parts: int) -> nn.Parameter:
    size = weight.shape[dim] // parts
    return nn.Parameter(weight.detach().narrow(dim, rank * size, size).clone())


def _gather_input(tp: Transport):
    return lambda _module, args: (gather_rows(args[0], tp), *args[1:])


def _reduce_scatter_output(tp: Transport):
    return lambda _module, _args, out: reduce_scatter_rows(out, tp)


# How a split parameter's tp shards are put back together (for tests and whole-model views): stacked [tp, ...]
# shards concatenated along dim 0 or 1, or - a fused projection such as q/k/v - per section: ``fused(H, Hkv, Hkv)``
# says the rows are sections in those proportions (heads), each split over the ranks on its own.
ROWS, COLUMNS, FUSED = "rows", "columns", "fused:"


def fused(*sections: int) -> str:
    """How a tensor whose dim 0 is ``sections`` (in proportion, e.g. heads of q, k and v) is split: each section
    by contiguous rows over the ranks, rank r's shard being the r-th part of every section, in order."""
    return FUSED + ",".join(str(n) for n in sections)


def _sections(how: str, rows: int) -> list[int]:
    """The row counts of a fused tensor's sections, for ``rows`` rows in all."""
    parts = [int(n) for n in how[len(FUSED) :].split(",")]
    return [rows * n // sum(parts) for n in parts]


def unsplit(shards: torch.Tensor, how: str) -> torch.Tensor:
    """The whole tensor from its tp shards stacked along a new dim 0."""
    if how.startswith(FUSED):
        per_rank = [shard.split(_sections(how, shard.shape[0])) for shard in shards.unbind(0)]
        return torch.cat([torch.cat(section) for section in zip(*per_rank)])
    return torch.cat(shards.unbind(0), dim=0 if how == ROWS else 1)


def split_for(whole: torch.Tensor, how: str, rank: int, parts: int) -> torch.Tensor:
    """The inverse of :func:`unsplit`: ``rank``'s shard of the whole tensor."""
    if how.startswith(FUSED):
        return torch.cat([section.chunk(parts)[rank] for section in whole.split(_sections(how, whole.shape[0]))])
    return whole.chunk(parts, dim=0 if how == ROWS else 1)[rank]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum of partial values that each rank then uses its own way: every rank's input reaches every
    rank's output, so backward sums the gradients over the ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: Transport, name: str) -> torch.Tensor:
        ctx.tp, ctx.name = tp, name
        return tp.all_reduce(x.detach().clone().contiguous(), name=name).wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.tp.all_reduce(grad.clone().contiguous(), name=f"{ctx.name}.backward").wait(), None, None


class TensorParallelRMSNorm(nn.RMSNorm):
    """RMSNorm over a width split over the tp ranks (OLMoE's q/k norm over all heads): this rank holds its
    columns' ``weight`` and the mean square sums every rank's columns. x_...w -> y_...w. An ``nn.RMSNorm``, so
    that the optimizer puts its weight in the norm's decay group, as it does the whole norm's."""

    def __init__(self, weight_w: torch.Tensor, eps: float, width: int, tp: Transport):
        super().__init__(weight_w.shape[0], eps=eps)
        self.weight = nn.Parameter(weight_w.detach().clone())
        self.width, self.tp = width, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = _SumOverRanks.apply(x.float().square().sum(-1, keepdim=True), self.tp, "tp.norm_squares")
        return (x.float() * torch.rsqrt(squares / self.width + self.eps)).to(x.dtype) * self.weight


def parallelize_fused_attention(attn: nn.Module, tp: Transport) -> dict[nn.Parameter, str]:
    """An attention with a fused ``qkv`` projection ([H Dh + 2 Hkv Dh, D] and optional bias: q, k, v rows), an
    output projection ``proj``, ``n_heads``, ``n_kv_heads`` and optional ``q_norm`` / ``k_norm``: keep H / tp
    query heads and Hkv / tp key/value heads (column-parallel; query head i uses kv head i // (H / Hkv), so a
    rank's query heads find their kv heads on the same rank) and the matching input columns of the output
    projection (row-parallel). Per-head q/k norms stay whole; norms over the whole width are split with their
    heads and sum their mean square over tp. Returns the parameters that are now split over tp, and how."""
    rank, parts = tp.rank, tp.world_size
    if attn.n_kv_heads % parts:
        raise LayoutError(f"parallel.tp={parts} must divide the key/value heads model.n_kv_heads={attn.n_kv_heads}")
    how = fused(attn.n_heads, attn.n_kv_heads, attn.n_kv_heads)
    attn.qkv.weight = nn.Parameter(split_for(attn.qkv.weight.detach(), how, rank, parts).clone())
    split = {attn.qkv.weight: how}
    if attn.qkv.bias is not None:
        attn.qkv.bias = nn.Parameter(split_for(attn.qkv.bias.detach(), how, rank, parts).clone())
        split[attn.qkv.bias] = how
    attn.proj.weight = _shard(attn.proj.weight, 1, rank, parts)
    split[attn.proj.weight] = COLUMNS
    if attn.qk_norm == "full":
        for name in ("q_norm", "k_norm"):
            norm = getattr(attn, name)
            shard = TensorParallelRMSNorm(norm.weight.chunk(parts)[rank], norm.eps, norm.weight.shape[0], tp)
            setattr(attn, name, shard)
            split[shard.weight] = ROWS
    attn.n_heads //= parts
    attn.n_kv_heads //= parts
    attn.register_forward_pre_hook(_gather_input(tp))
    attn.register_forward_hook(_reduce_scatter_output(tp))
    return split


def parallelize_ffn(ffn: nn.Module, tp: Transport) -> dict[nn.Parameter, str]:
    """A dense FeedForward split over its hidden size: w1 (and w3) by columns, w2 by rows."""
    rank, parts = tp.rank, tp.world_size
    ffn.w1 = _shard(ffn.w1, 1, rank, parts)
    ffn.w2 = _shard(ffn.w2, 0, rank, parts)
    if ffn.w3 is not None:
        ffn.w3 = _shard(ffn.w3, 1, rank, parts)
    ffn.register_forward_pre_hook(_gather_input(tp))
    ffn.register_forward_hook(_reduce_scatter_output(tp))
    return {w: how for w, how in ((ffn.w1, COLUMNS), (ffn.w2, ROWS), (ffn.w3, COLUMNS)) if w is not None}


def parallelize_embeddings(
    model: nn.Module, adapter: ModelAdapter, tp: Transport, vocab_size: int, tied: bool
) -> dict[nn.Parameter, str]:
    """Vocabulary-parallel embedding and LM head (whichever of them this pipeline stage holds)."""
    rank, parts = tp.rank, tp.world_size
    split = {}
    embedding, head = getattr(model, adapter.embedding), getattr(model, adapter.head)
    if embedding is not None:
        local = vocab_size // parts
        embedding = VocabParallelEmbedding(_shard(embedding.weight, 0, rank, parts).data, rank * local, tp)
        setattr(model, adapter.embedding, embedding)
        split[embedding.weight] = ROWS
    if head is not None:
        if tied and embedding is not None:
            head.weight = embedding.weight
        else:
            head.weight = _shard(head.weight, 0, rank, parts)
            split[head.weight] = ROWS
        head.register_forward_pre_hook(_gather_input(tp))
    return split


def check_tensor_parallel(tp: int, vocab_size: int, dense_ffn_dim: int, kv_heads: int | None = None) -> None:
    """What the model needs for an even split over tp; names the field."""
    if kv_heads is not None and kv_heads % tp:
        raise LayoutError(f"parallel.tp={tp} must divide the key/value heads model.n_kv_heads={kv_heads}")
    if vocab_size % tp:
        raise LayoutError(f"parallel.tp={tp} must divide the vocabulary size {vocab_size}")
    if dense_ffn_dim % tp:
        raise LayoutError(f"parallel.tp={tp} must divide model.dense_ffn_dim={dense_ffn_dim}")
