"""Model FLOPs and MFU of a training step.

**FLOPs** (training = 3 x forward: the backward of each GEMM is two GEMMs of the same size). Forward, per token:

    per block  2 D (H Dh + 2 Hkv Dh) + 2 H Dh D     attention projections (fused q k v, out)
             + 2 x 2 H Dh S / 2                   scores and weighted values, causal: S / 2 keys on average
             + 2 D E                              router (MoE blocks)
             + FFN(F_shared) [+ 2 D]              the shared experts together, when there are any [their gate]
             + FFN(F_dense)                       a dense block's FFN
    head     2 D V                                output projection (the embedding lookup is free)

where FFN(F) = 2 x 2 D F, or 2 x 3 D F with SwiGLU (three matrices). For the experts, per (token, expert) row
actually computed in the step (pairs dropped by capacity are not computed; rows an activation checkpoint recomputes
are not model FLOPs): FFN(F_expert). Norms, activations, softmax and the optimizer are not counted (the usual
convention, as in PaLM's MFU).

**Peak** per device: the bf16 dense figure of the GPU's datasheet (:data:`GPU_PEAK_TFLOPS`; fp32 runs use the
non-tensor-core fp32 figure), ``train.peak_tflops`` (``--peak-tflops``) when set, or on the CPU a matmul measured
at start-up with this process's threads. MFU = achieved FLOP/s per device / peak.

Shapes: D model dim, H heads, Hkv key/value heads, Dh head dim, S sequence length, E experts, F hidden dims,
V vocabulary.
"""

from __future__ import annotations

import time

import torch

from hecate.parallel.config import MoEConfig
from hecate.trainer.config import ModelConfig, RunConfig

# (bf16 dense, fp32 without TF32) TFLOP/s per GPU, from the vendors' datasheets (SXM parts)
GPU_PEAK_TFLOPS = {"A100": (312.0, 19.5), "H100": (989.0, 67.0), "H200": (989.0, 67.0)}
CPU_PEAK_SIZE = 512  # the square matmul timed for the CPU's peak
CPU_PEAK_ROUNDS = 5


def ffn_flops(dim: int, hidden: int, activation: str) -> float:
    """Forward FLOPs per token of an FFN of ``hidden`` units (SwiGLU has three matrices, GELU two)."""
    return 2 * dim * hidden * (3 if activation == "swiglu" else 2)


def forward_flops_per_token(model: ModelConfig, moe: MoEConfig, vocab_size: int) -> dict[str, float]:
    """Forward FLOPs per token of everything but the routed experts, by kind: ``matmul`` (products with weights)
    and ``attention`` (scores and weighted values)."""
    d, q_width, kv_width = model.dim, model.n_heads * model.head_size, model.kv_heads * model.head_size
    matmul, attention = 2 * d * vocab_size, 0.0
    for index in range(model.n_layers):
        matmul += 2 * d * (q_width + 2 * kv_width) + 2 * q_width * d
        attention += 2 * 2 * q_width * model.seq_len / 2
        if moe.is_moe_block(index):
            matmul += 2 * d * moe.num_experts + (2 * d if moe.shared_gate else 0)
            matmul += ffn_flops(d, moe.shared_hidden, moe.activation) if moe.shared_experts else 0
        else:
            matmul += ffn_flops(d, model.dense_ffn_dim, model.dense_activation)
    return {"matmul": matmul, "attention": attention}


def expert_flops_per_row(cfg: RunConfig) -> float:
    """Forward FLOPs of one (token, expert) row through one expert."""
    return ffn_flops(cfg.model.dim, cfg.moe.ffn_dim, cfg.moe.activation)


def step_flops(cfg: RunConfig, vocab_size: int, tokens: int, expert_rows: int) -> float:
    """Training FLOPs of one step over all ranks: ``tokens`` in the global batch, ``expert_rows`` the (token,
    expert) rows the MoE layers computed (routed pairs minus dropped ones, summed over layers)."""
    dense = sum(forward_flops_per_token(cfg.model, cfg.moe, vocab_size).values())
    return 3 * (tokens * dense + expert_rows * expert_flops_per_row(cfg))


def peak_flops(device: torch.device, dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if model in name:
                return (bf16 if dtype == "bf16" else fp32) * 1e12, f"datasheet {model} {dtype}"
        return float("nan"), f"{name} is not in the peak table: set --peak-tflops"
    return measured_cpu_peak(dtype), f"measured CPU matmul ({torch.get_num_threads()} threads, {dtype})"


def measured_cpu_peak(dtype: str) -> float:
    """FLOP/s of a square ``torch.mm`` on this CPU with this process's threads (best of a few rounds)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = CPU_PEAK_SIZE
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device="cpu").to(torch_dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=torch_dtype, device="cpu")
    best = float("inf")
    for _ in range(CPU_PEAK_ROUNDS + 1):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
