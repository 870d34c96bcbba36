"""The benchmarks' FLOPs models (benchmarks/floor.py, benchmarks/end_to_end.py) against the GEMM FLOPs that
torch's own counter sees in a real forward + backward: the floor and the MFU are only as right as these."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import floor  # noqa: E402

from hecate.parallel.config import MoEConfig  # noqa: E402
from hecate.parallel.moe import MoE  # noqa: E402
from hecate.trainer.config import ModelConfig, RunConfig  # noqa: E402
from hecate.trainer.flops import expert_flops_per_row, forward_flops_per_token  # noqa: E402
from hecate.trainer.model import Transformer  # noqa: E402

GEMMS = {"mm", "addmm", "bmm", "matmul"}


def gemm_flops(counter: FlopCounterMode) -> int:
    """FLOPs of the matrix products only (attention kernels are counted apart in the models)."""
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if op.__name__.split(".")[0] in GEMMS)


def test_layer_flops_match_counted_gemms():
    shape = floor.LayerShape(dim=32, ffn_dim=48, experts=4, top_k=2, tokens=64)
    torch.manual_seed(0)
    layer = MoE(shape.dim, MoEConfig(num_experts=shape.experts, top_k=shape.top_k, ffn_dim=shape.ffn_dim))
    x_TD = torch.randn(shape.tokens, shape.dim, requires_grad=True)  # a layer inside a model: dx is needed
    with FlopCounterMode(display=False) as counter:
        layer(x_TD).square().mean().backward()
    assert gemm_flops(counter) == shape.flops()


MODELS = {
    "gelu, one dense block": (
        ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, dense_ffn_dim=48),
        MoEConfig(num_experts=4, top_k=2, every=2, ffn_dim=40),
    ),
    "gqa, swiglu, gated shared experts": (
        ModelConfig(
            dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, seq_len=16, dense_ffn_dim=48,
            dense_activation="swiglu", attention_bias=True,
        ),
        MoEConfig(
            num_experts=4, top_k=2, every=2, ffn_dim=40, activation="swiglu", shared_experts=2, shared_ffn_dim=24,
            shared_gate=True,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matmul_flops_match_counted_gemms(name):
    """The trainer's FLOPs model (MFU in metrics, the end-to-end benchmark) against torch's counter, dropless."""
    model_cfg, moe_cfg = MODELS[name]
    vocab, batch = 100, 3
    model = Transformer(model_cfg, moe_cfg, vocab)
    tokens_BS = torch.randint(0, vocab, (batch, model_cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens_BS).square().mean().backward()
    tokens, moe_blocks = batch * model_cfg.seq_len, sum(moe_cfg.is_moe_block(i) for i in range(model_cfg.n_layers))
    routed = tokens * moe_cfg.top_k * moe_blocks * expert_flops_per_row(RunConfig(model=model_cfg, moe=moe_cfg))
    # the first block's input is the embedding output, which needs a gradient: every GEMM runs 3 times
    assert gemm_flops(counter) == 3 * (forward_flops_per_token(model_cfg, moe_cfg, vocab)["matmul"] * tokens + routed)
