"""``hecate plan``: which ranks do what under a layout, and what each rank holds in memory - before any
process starts. Parameter counts come from building the model on the meta device (no memory, exact shapes)."""

from __future__ import annotations

import torch

from hecate.parallel.errors import LayoutError
from hecate.parallel.parallelize import check_layout
from hecate.parallel.pipeline import bubble_fraction, split_stages
from hecate.parallel.tensor_parallel import check_tensor_parallel
from hecate.parallel.topology import DENSE_DIMS, MOE_DIMS, ParallelDims
from hecate.trainer.config import RunConfig
from hecate.trainer.device import cuda_available
from hecate.trainer.model import Transformer
from hecate.trainer.model_adapter import TRANSFORMER

BYTES_FP32 = 4
ADAMW_MOMENTS = 2
# Saved activations per token per block, in units of model.dim values: the block input, the norms, q/k/v, the
# attention output, the FFN input and the router/expert intermediates (~ top_k * ffn_dim / dim). A rough bound
# that is good enough to compare layouts; the simulator (issue 11) refines it.
ACTIVATION_VALUES_PER_DIM = 12


def layout_of(cfg: RunConfig, world: int) -> ParallelDims:
    """The run's validated layout on ``world`` ranks: it must fit the model and split every micro-batch evenly
    over the data-parallel ranks. Launchers call this before starting workers."""
    dims = check_layout(cfg.parallel, world, cfg.moe.num_experts, cfg.model.n_layers, cfg.model.n_heads, cfg.fssdp)
    rows = cfg.train.global_batch // cfg.train.grad_accum
    if rows % dims.dp:
        raise LayoutError(
            f"train.global_batch={cfg.train.global_batch} / train.grad_accum={cfg.train.grad_accum} "
            f"= {rows} sequences per micro-batch cannot be split over {dims.dp} data-parallel ranks"
        )
    if rows // dims.dp % dims.tp:
        raise LayoutError(
            f"parallel.tp={dims.tp} must divide the {rows // dims.dp} sequences of a micro-batch on each "
            f"data-parallel rank: the norm and MoE regions split them by rows (sequence parallelism)"
        )
    if cfg.moe.overlap_sub_batches > 1 and dims.tp * dims.pp * dims.etp > 1:
        raise LayoutError(
            f"moe.overlap_sub_batches={cfg.moe.overlap_sub_batches} interleaves the sub-batches of a "
            f"block; it runs under data, expert and FSSDP parallelism, not with parallel.tp, pp or etp "
            f"> 1 (got tp={dims.tp}, pp={dims.pp}, etp={dims.etp})"
        )
    if cfg.model.dense_ffn_dim % dims.tp:
        raise LayoutError(f"parallel.tp={dims.tp} must divide model.dense_ffn_dim={cfg.model.dense_ffn_dim}")
    if cfg.moe.ffn_dim % dims.etp:
        raise LayoutError(f"parallel.etp={dims.etp} must divide moe.ffn_dim={cfg.moe.ffn_dim}")
    if dims.pp > 1 and cfg.train.grad_accum < dims.pp:
        raise LayoutError(
            f"parallel.pp={dims.pp}: the 1F1B schedules need train.grad_accum >= {dims.pp} "
            f"micro-batches per step, got {cfg.train.grad_accum}"
        )
    if cfg.parallel.pp_virtual > 1 and cfg.train.grad_accum % dims.pp:
        raise LayoutError(
            f"parallel.pp_virtual={cfg.parallel.pp_virtual} (interleaved 1F1B) needs train.grad_accum "
            f"to be a multiple of parallel.pp={dims.pp}, got {cfg.train.grad_accum}"
        )
    return dims


def parameter_counts(cfg: RunConfig, vocab_size: int) -> tuple[int, int]:
    """(dense parameters, expert parameters) of the whole model."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, vocab_size)
    experts = sum(p.numel() for layer in model.moe_layers().values() for p in layer.experts.parameters())
    return sum(p.numel() for p in model.parameters()) - experts, experts


def memory_per_rank(cfg: RunConfig, dims: ParallelDims, vocab_size: int) -> dict[str, float]:
    """Bytes per rank (fp32 master weights): dense weights split over pp x tp, experts over pp x ep x etp."""
    dense, experts = parameter_counts(cfg, vocab_size)
    params = dense / (dims.pp * dims.tp) + experts / (dims.pp * dims.ep * dims.etp)
    micro_tokens = cfg.train.global_batch // (cfg.train.grad_accum * dims.dp) * cfg.model.seq_len
    layers_per_stage = -(-cfg.model.n_layers // dims.pp)
    activations = micro_tokens * cfg.model.dim * ACTIVATION_VALUES_PER_DIM * layers_per_stage / dims.tp
    logits = micro_tokens * vocab_size / dims.tp * (2 if dims.pp == 1 else 1)  # logits + their gradient
    return {
        "parameters": params * BYTES_FP32,
        "gradients": params * BYTES_FP32,
        "optimizer": params * BYTES_FP32 * ADAMW_MOMENTS,
        "activations": (activations + logits) * BYTES_FP32,
    }


def check_ranks_fit_gpu(cfg: RunConfig, dims: ParallelDims, vocab_size: int, ranks: int, gpu_bytes: int) -> None:
    """Refuse ``ranks`` simulated ranks on one GPU of ``gpu_bytes`` when their estimated memory does not fit: each
    is capped to 1/ranks of it."""
    need = sum(memory_per_rank(cfg, dims, vocab_size).values())
    share = gpu_bytes / ranks
    if need > share:
        raise LayoutError(
            f"--simulate {dims.world} with train.device={cfg.train.device}: {ranks} ranks share one GPU of "
            f"{gpu_bytes / 2**30:.1f} GiB, {share / 2**30:.2f} GiB each, but a rank needs ~{need / 2**30:.2f} GiB "
            f"(hecate plan): simulate fewer ranks, or shrink the model or micro-batch"
        )


def device_lines(cfg: RunConfig, dims: ParallelDims, vocab_size: int) -> list[str]:
    """Where each rank computes and what a GPU then holds."""
    per_rank = sum(memory_per_rank(cfg, dims, vocab_size).values()) / 2**20
    if cfg.train.device == "cpu" or (cfg.train.device == "auto" and not cuda_available()):
        return [f"  device: every rank on the CPU (train.device={cfg.train.device}); {per_rank:.1f} MiB per rank"]
    return [
        f"  device: rank r on cuda:LOCAL_RANK (one GPU per rank; --simulate N on fewer GPUs shares them, each rank "
        f"capped to its share); memory per GPU {per_rank:.1f} MiB with one rank each (train.device={cfg.train.device})"
    ]


def _model_parallel_lines(cfg: RunConfig, dims: ParallelDims, vocab_size: int) -> list[str]:
    """Folding, tensor-parallel splits and pipeline stages, when the layout has them."""
    lines = []
    if dims.tp > 1 or dims.ep * dims.etp != dims.dp:
        lines.append(
            f"  folding: attention/dense layers dp x tp = {dims.dp} x {dims.tp}, MoE layers edp x ep x etp = "
            f"{dims.edp} x {dims.ep} x {dims.etp}, over the same {dims.dp * dims.tp} ranks of each stage"
        )
    if dims.tp > 1:
        check_tensor_parallel(dims.tp, vocab_size, cfg.model.dense_ffn_dim, cfg.model.kv_heads)
        lines.append(
            f"  tensor parallel: {cfg.model.n_heads // dims.tp} of {cfg.model.n_heads} heads, "
            f"{vocab_size // dims.tp} of {vocab_size} vocabulary rows, "
            f"{cfg.model.dense_ffn_dim // dims.tp} of {cfg.model.dense_ffn_dim} dense FFN hidden per rank; "
            f"norms, routers and MoE layers hold 1/{dims.tp} of each micro-batch's rows"
        )
    if dims.pp > 1:
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.moe, vocab_size)
        virtual, micro = cfg.parallel.pp_virtual, cfg.train.grad_accum
        split = split_stages(model, TRANSFORMER, dims.pp * virtual, list(cfg.parallel.pp_stage_blocks))
        schedule = "1F1B" if virtual == 1 else f"interleaved 1F1B ({virtual} stages per rank)"
        lines.append(
            f"  pipeline: {schedule}, {micro} micro-batches per step, theoretical bubble "
            f"{bubble_fraction(dims.pp, virtual, micro):.1%}"
        )
        for stage, blocks in enumerate(split):
            extra = (" + embedding" if stage == 0 else "") + (" + head" if stage == len(split) - 1 else "")
            lines.append(f"    stage {stage} on pp rank {stage % dims.pp}: blocks {blocks}{extra}")
    return lines


def describe_plan(cfg: RunConfig, world: int, vocab_size: int) -> str:
    dims = layout_of(cfg, world)
    lines = [
        f"world {world}: pp={dims.pp} dp={dims.dp} tp={dims.tp} | MoE folded: edp={dims.edp} ep={dims.ep} "
        f"etp={dims.etp}",
        "",
    ]
    for dim in (*DENSE_DIMS, *MOE_DIMS[1:]):
        lines.append(f"  {dim:>4} groups: {dims.groups(dim)}")
    experts_per_rank = cfg.moe.num_experts // dims.ep
    lines += [
        "",
        f"  experts per rank per MoE layer: {experts_per_rank} (of {cfg.moe.num_experts})"
        + (
            f", each split over etp={dims.etp} ranks ({cfg.moe.ffn_dim // dims.etp} of {cfg.moe.ffn_dim} hidden)"
            if dims.etp > 1
            else ""
        ),
    ]
    lines += _model_parallel_lines(cfg, dims, vocab_size) + [""]
    dense, experts = parameter_counts(cfg, vocab_size)
    lines.append(
        f"  model: {dense / 1e6:.2f}M dense + {experts / 1e6:.2f}M expert parameters (vocabulary {vocab_size})"
    )
    memory = memory_per_rank(cfg, dims, vocab_size)
    lines.append(
        "  memory per rank (fp32 weights, AdamW): "
        + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in memory.items())
        + f"; total {sum(memory.values()) / 2**20:.1f} MiB"
    )
    lines += device_lines(cfg, dims, vocab_size)
    return "\n".join(lines)
