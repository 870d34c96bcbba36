"""What one training step asks of each device, from a run config: FLOPs per token and per expert row, bytes
per expert and per token row, parameters. Counted as the model in ``trainer/model.py`` computes them.

FLOPs (multiply-add = 2), forward; backward is twice forward:
- attention block: q, k, v and output projections 8 D^2 per token, causal scores and weighted sum 2 S D;
- router 2 D E per token; one expert row 2 M D F (M = 2 matrices for gelu, 3 for swiglu);
- a dense FFN block 4 D F_dense per token; the LM head 2 D V per token (embeddings are tied, a lookup).

``block_only`` describes one transformer block without embeddings, head, gradient all-reduce and optimizer:
the MoE block that the calibration benchmark times (``benchmarks/calibrate_scaling.py``).

Shapes: D model dim, S sequence, F expert hidden, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hecate.collectives.errors import ConfigError
from hecate.parallel.fssdp.measured import BACKWARD_OVER_FORWARD as BACKWARD_OVER_FORWARD  # one constant
from hecate.trainer.config import RunConfig


@dataclass(frozen=True)
class Workload:
    dim: int
    seq_len: int
    n_layers: int
    moe_layers: tuple[int, ...]  # block indices with an MoE FFN
    num_experts: int
    top_k: int
    ffn_dim: int
    expert_matrices: int
    dense_ffn_dim: int
    shared_hidden: int  # hidden size of the shared experts together (0: none)
    vocab_size: int
    tokens_per_gpu: int
    block_only: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig, tokens_per_gpu: int, block_only: bool = False) -> Workload:
        if tokens_per_gpu < 1:
            raise ConfigError("--tokens-per-gpu", f"must be >= 1, got {tokens_per_gpu}")
        moe = cfg.moe
        layers = tuple(i for i in range(cfg.model.n_layers) if moe.is_moe_block(i))
        return cls(
            cfg.model.dim,
            cfg.model.seq_len,
            cfg.model.n_layers,
            layers,
            moe.num_experts,
            moe.top_k,
            moe.ffn_dim,
            3 if moe.activation == "swiglu" else 2,
            cfg.model.dense_ffn_dim,
            moe.shared_hidden,
            cfg.data.vocab_size,
            tokens_per_gpu,
            block_only,
        )

    @property
    def pairs_per_gpu(self) -> int:
        return self.tokens_per_gpu * self.top_k

    # ---- FLOPs (forward) ------------------------------------------------------------------------

    def attention_flops(self, tokens: int) -> float:
        """One block's attention (projections and causal attention) plus the router of an MoE block."""
        return tokens * (
            8 * self.dim**2
            + 2 * self.seq_len * self.dim
            + 2 * self.dim * self.num_experts
            + 2 * self.expert_matrices * self.dim * self.shared_hidden
        )

    def expert_flops(self, rows: int | float) -> float:
        return rows * 2 * self.expert_matrices * self.dim * self.ffn_dim

    def dense_block_flops(self, tokens: int) -> float:
        """A block with a dense FFN (not an MoE layer): attention without router, plus the FFN."""
        return tokens * (8 * self.dim**2 + 2 * self.seq_len * self.dim + 4 * self.dim * self.dense_ffn_dim)

    def head_flops(self, tokens: int) -> float:
        return 0.0 if self.block_only else tokens * 2 * self.dim * self.vocab_size

    # ---- parameters -------------------------------------------------------------------------------

    @property
    def expert_params(self) -> int:
        return self.expert_matrices * self.dim * self.ffn_dim

    @property
    def dense_params(self) -> int:
        """Replicated on every device: attention, norms, routers, dense FFNs, shared experts, embeddings."""
        per_block = 4 * self.dim**2 + 2 * self.dim
        moe_extra = self.dim * self.num_experts + self.expert_matrices * self.dim * self.shared_hidden
        dense_ffn = 2 * self.dim * self.dense_ffn_dim
        total = sum(per_block + (moe_extra if i in self.moe_layers else dense_ffn) for i in range(self.n_layers))
        return total + (0 if self.block_only else self.vocab_size * self.dim + self.dim)
