"""Which Hugging Face tensors make each of Hecate's parameters, and how: one :class:`Entry` a parameter.

Layouts: transformers' ``nn.Linear`` weights are [out, in] and Hecate's FFN matrices [in, out] (``x @ w1``), so
FFN and expert matrices are transposed; per-expert matrices (``experts.E.gate_proj``) are stacked into [E, ...]
(or come fused, ``experts.gate_up_proj`` [E, 2F, D] and ``experts.down_proj`` [E, D, F]); q, k and v projections
(and biases) are concatenated into the fused ``qkv``, their rows put in Hecate's RoPE order (see the package).

Shapes: E experts, D model dim, F expert hidden dim, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hecate.parallel.config import MoEConfig
from hecate.trainer.config import ModelConfig
from hecate.trainer.hf.families import DENSE_MATRICES, Family

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """One Hecate parameter from its HF tensors (``to_hecate``) and back (``to_hf``, same order as ``hf``). An
    expert entry's HF tensors are per expert, in expert order (or one fused [E, ...] tensor each): a reader can
    take the rows of the experts it holds only."""

    hecate: str
    hf: tuple[str, ...]
    to_hecate: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]
    experts: str = ""  # "" for dense tensors; "per_expert" or "fused" for expert tensors


def rope_rows(width: int, head_dim: int) -> torch.Tensor:
    """Index of the HF row each Hecate row takes: in every head, Hecate's pair (2i, 2i + 1) is HF's (i, i + Dh/2)."""
    within = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    return (torch.arange(width // head_dim).unsqueeze(1) * head_dim + within).reshape(-1)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, index.to(t.device))


def _same(ts: Tensors) -> torch.Tensor:
    return ts[0]


def _one(t: torch.Tensor) -> Tensors:
    return [t]


def _transposed(ts: Tensors) -> torch.Tensor:
    return ts[0].t().contiguous()


def _transposed_back(t: torch.Tensor) -> Tensors:
    return [t.t().contiguous()]


def _stacked(ts: Tensors) -> torch.Tensor:
    """Per-expert [out, in] matrices -> [E, in, out]."""
    return torch.stack([t.t() for t in ts]).contiguous()


def _unstacked(t_E: torch.Tensor) -> Tensors:
    return [t.t().contiguous() for t in t_E.unbind(0)]


def _fused_qkv(widths: tuple[int, int, int], head_dim: int) -> tuple[Callable, Callable]:
    """q, k, v (weights or biases) <-> the fused qkv rows, q and k rows in Hecate's RoPE order."""
    q_index, k_index = rope_rows(widths[0], head_dim), rope_rows(widths[1], head_dim)
    q_back, k_back = q_index.argsort(), k_index.argsort()

    def to_hecate(ts: Tensors) -> torch.Tensor:
        return torch.cat([_rows(ts[0], q_index), _rows(ts[1], k_index), ts[2]])

    def to_hf(t: torch.Tensor) -> Tensors:
        q, k, v = t.split(widths)
        return [_rows(q, q_back).contiguous(), _rows(k, k_back).contiguous(), v.contiguous()]

    return to_hecate, to_hf


def _rope_ordered(width: int, head_dim: int) -> tuple[Callable, Callable]:
    """A q/k norm weight: its features in Hecate's RoPE order."""
    index = rope_rows(width, head_dim)
    back = index.argsort()
    return (lambda ts: _rows(ts[0], index)), (lambda t: [_rows(t, back).contiguous()])


def tensor_map(model: ModelConfig, moe: MoEConfig, family: Family, fused_experts: bool = False) -> list[Entry]:
    """Every Hecate parameter (and the router's expert_bias buffer is not one: it stays zero) with its source."""
    entries = [Entry("tok_emb.weight", ("model.embed_tokens.weight",), _same, _one)]
    for i in range(model.n_layers):
        entries += _attention(model, i)
        hf, ours = f"model.layers.{i}", f"blocks.{i}"
        entries.append(Entry(f"{ours}.attn_norm.weight", (f"{hf}.input_layernorm.weight",), _same, _one))
        entries.append(Entry(f"{ours}.ffn_norm.weight", (f"{hf}.post_attention_layernorm.weight",), _same, _one))
        if moe.is_moe_block(i):
            entries += _moe(moe, family, f"{hf}.{family.moe_block}", f"{ours}.ffn", fused_experts)
        else:
            entries += _dense(f"{hf}.mlp", f"{ours}.ffn")
    entries.append(Entry("norm.weight", ("model.norm.weight",), _same, _one))
    if not model.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head.weight",), _same, _one))
    return entries


def _attention(model: ModelConfig, i: int) -> list[Entry]:
    hf, ours = f"model.layers.{i}.self_attn", f"blocks.{i}.attn"
    Dh = model.head_size
    widths = (model.n_heads * Dh, model.kv_heads * Dh, model.kv_heads * Dh)
    names = [f"{hf}.{p}_proj" for p in "qkv"]
    to_hecate, to_hf = _fused_qkv(widths, Dh)
    entries = [
        Entry(f"{ours}.qkv.weight", tuple(f"{n}.weight" for n in names), to_hecate, to_hf),
        Entry(f"{ours}.proj.weight", (f"{hf}.o_proj.weight",), _same, _one),
    ]
    if model.attention_bias:
        entries.append(Entry(f"{ours}.qkv.bias", tuple(f"{n}.bias" for n in names), to_hecate, to_hf))
    if model.qk_norm != "none":
        for name, width in (("q_norm", widths[0]), ("k_norm", widths[1])):
            width = width if model.qk_norm == "full" else Dh
            entries.append(Entry(f"{ours}.{name}.weight", (f"{hf}.{name}.weight",), *_rope_ordered(width, Dh)))
    return entries


def _dense(hf: str, ours: str) -> list[Entry]:
    """A SwiGLU FFN: gate -> w1, up -> w3, down -> w2 (each transposed)."""
    gate, up, down = (f"{hf}.{m}.weight" for m in DENSE_MATRICES)
    return [
        Entry(f"{ours}.{w}", (name,), _transposed, _transposed_back)
        for w, name in (("w1", gate), ("w3", up), ("w2", down))
    ]


def _moe(moe: MoEConfig, family: Family, hf: str, ours: str, fused_experts: bool) -> list[Entry]:
    entries = [Entry(f"{ours}.router.gate.weight", (f"{hf}.gate.weight",), _same, _one)]
    if fused_experts:
        entries += _fused_experts(moe.ffn_dim, f"{hf}.experts", f"{ours}.experts")
    else:
        for w, matrix in zip(("w1", "w3", "w2"), family.expert_matrices):
            names = tuple(f"{hf}.experts.{e}.{matrix}.weight" for e in range(moe.num_experts))
            entries.append(Entry(f"{ours}.experts.{w}", names, _stacked, _unstacked, "per_expert"))
    if moe.shared_experts:
        entries += _dense(f"{hf}.shared_expert", f"{ours}.shared")
    if moe.shared_gate:
        entries.append(Entry(f"{ours}.shared_gate.weight", (f"{hf}.shared_expert_gate.weight",), _same, _one))
    return entries


def _fused_experts(ffn_dim: int, hf: str, ours: str) -> list[Entry]:
    """transformers' in-memory layout: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""

    def half(which: int) -> Callable:
        return lambda ts: ts[0][:, which * ffn_dim : (which + 1) * ffn_dim].transpose(1, 2).contiguous()

    def unsupported(_t: torch.Tensor) -> Tensors:
        raise NotImplementedError("export writes per-expert tensors")

    return [
        Entry(f"{ours}.w1", (f"{hf}.gate_up_proj",), half(0), unsupported, "fused"),
        Entry(f"{ours}.w3", (f"{hf}.gate_up_proj",), half(1), unsupported, "fused"),
        Entry(f"{ours}.w2", (f"{hf}.down_proj",), lambda ts: ts[0].transpose(1, 2).contiguous(), unsupported, "fused"),
    ]
