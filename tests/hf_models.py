"""Tiny random models of the Hugging Face families, made offline with transformers itself (config -> model ->
save_pretrained), with every weight drawn at random (norm weights and biases too, so that a mix-up shows)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2, rms_norm_eps=1e-5)  # fmt: skip
FAMILIES = {  # each exercises different options
    "mixtral": dict(intermediate_size=32, num_local_experts=4, rope_theta=1e4, tie_word_embeddings=False),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                      num_experts=4, mlp_only_layers=[0], norm_topk_prob=False, qkv_bias=True),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4, head_dim=32,
                      mlp_only_layers=[0], norm_topk_prob=True),
    "olmoe": dict(intermediate_size=32, num_experts=4, norm_topk_prob=False, tie_word_embeddings=True),
}  # fmt: skip


def make_hf_model(family: str, folder: Path, vocab_size: int, tokenizer_json: Path, seed: int = 0) -> Path:
    """A random ``family`` model saved in ``folder`` with ``tokenizer_json`` beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **ids, **COMMON, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


def hf_logits(folder: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens_BS).logits
