"""A decoder-only MoE transformer that reads top to bottom. No parallelism here: ``parallel/`` applies it
from outside (expert parallelism swaps the MoE dispatcher, pipeline parallelism keeps a slice of ``blocks``).

Shapes: B batch, b sequences of a sub-batch, S sequence, D model dim, H heads, Hkv key/value heads, Dh head dim,
V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hecate.parallel.config import MoEConfig
from hecate.parallel.moe import FeedForward, MoE
from hecate.trainer.config import ModelConfig


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles, each [S, Dh/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_SF.cos().float(), angles_SF.sin().float()


def apply_rope(x_BHSDh: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) feature pairs by the position's angle."""
    x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
    cos, sin = cos_SF.to(x_BHSDh.dtype), sin_SF.to(x_BHSDh.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal self-attention with RoPE, computed by torch's SDPA. Grouped-query: ``n_kv_heads`` key/value heads,
    each serving n_heads / n_kv_heads consecutive query heads. One fused projection ``qkv`` computes q, k and v
    ([H Dh + 2 Hkv Dh, D], rows in that order, optionally with a bias); with ``qk_norm`` q and k pass an RMSNorm
    over each head (``head``) or over their whole width (``full``) before RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # heads computed here (tensor parallelism keeps n_heads / tp and n_kv_heads / tp of them)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        q_width, kv_width = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        self.qkv = nn.Linear(cfg.dim, q_width + 2 * kv_width, bias=cfg.attention_bias)
        self.proj = nn.Linear(q_width, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        norm_widths = {"head": (cfg.head_size, cfg.head_size), "full": (q_width, kv_width)}.get(cfg.qk_norm)
        self.q_norm = nn.RMSNorm(norm_widths[0], eps=cfg.norm_eps) if norm_widths else None
        self.k_norm = nn.RMSNorm(norm_widths[1], eps=cfg.norm_eps) if norm_widths else None

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, S, -1, Dh) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B, heads, S, Dh
        q, k = apply_rope(q, cos_SF[:S], sin_SF[:S]), apply_rope(k, cos_SF[:S], sin_SF[:S])
        out_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        return self.proj(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    """Pre-norm transformer block; its FFN is an MoE layer or a dense FeedForward."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        stds = dict(init_std=cfg.init_std, out_init_std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.ffn = (
            MoE(cfg.dim, moe, **stds)
            if moe is not None
            else FeedForward(cfg.dim, cfg.dense_ffn_dim, cfg.dense_activation, **stds)
        )

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ffn, MoE) and self.ffn.cfg.overlap_sub_batches > 1:
            return self.interleaved(x_BSD, cos_SF, sin_SF)
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SF, sin_SF)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def interleaved(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        """The same block on sub-batches of sequences: sub-batch i's tokens travel to their experts while the
        attention of sub-batch i + 1 computes (backward mirrors it); then all sub-batches' experts and combines.
        Every row sees the same computation as in ``forward``."""
        hidden, started = [], []
        for x_bSD in x_BSD.chunk(self.ffn.cfg.overlap_sub_batches):
            h_bSD = x_bSD + self.attn(self.attn_norm(x_bSD), cos_SF, sin_SF)
            hidden.append(h_bSD)
            started.append(self.ffn.begin(self.ffn_norm(h_bSD)))
        return torch.cat([h_bSD + y_bSD for h_bSD, y_bSD in zip(hidden, self.ffn.finish(started))])


class Transformer(nn.Module):
    """tokens_BS -> logits_BSV. ``blocks`` is a ModuleDict keyed by the global block index so that a
    pipeline stage can keep a slice of it with unchanged parameter names; a stage that does not hold the
    embedding or the head has them set to None and maps activations x_BSD to x_BSD instead."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = nn.ModuleDict(
            {str(i): Block(cfg, moe if moe.is_moe_block(i) else None) for i in range(cfg.n_layers)}
        )
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos_SF, sin_SF = rope_tables(cfg.seq_len, cfg.head_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos_SF, persistent=False)
        self.register_buffer("rope_sin", sin_SF, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2) so that the residual stream's variance does not grow with depth. FFN and expert weights are
        initialised by their own modules with the same two stds (see Block); biases start at zero, norms at one."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks.values():
            nn.init.normal_(block.attn.qkv.weight, std=std)
            if block.attn.qkv.bias is not None:
                nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.tok_emb(tokens_BS) if self.tok_emb is not None else tokens_BS
        for block in self.blocks.values():
            x_BSD = block(x_BSD, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x_BSD)) if self.lm_head is not None else x_BSD

    def moe_layers(self) -> dict[int, MoE]:
        """The MoE layers by block index; their ``stats`` hold the last forward's losses and loads."""
        return {int(i): b.ffn for i, b in self.blocks.items() if isinstance(b.ffn, MoE)}


def build_model(cfg: ModelConfig, moe: MoEConfig, vocab_size: int, seed: int) -> Transformer:
    """The same seed gives the same initial weights in every process and every layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(cfg, moe, vocab_size)
