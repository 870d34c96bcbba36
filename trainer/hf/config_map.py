"""A Hugging Face ``config.json`` <-> Hecate's model and MoE config, for the four families of :mod:`.families`.

Import refuses, naming the field, every option that would make Hecate's model compute something else than
transformers' (another activation, RoPE scaling, sliding windows, q/k/v clipping, dense blocks that are not the
first ones, ...). Export picks the family whose fixed options match the model and refuses the rest, naming the
Hecate field.
"""

from __future__ import annotations

from typing import Any

from hecate.parallel.config import MoEConfig
from hecate.trainer.config import ModelConfig
from hecate.trainer.errors import HfFormatError
from hecate.trainer.hf.families import FAMILIES, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, Family

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts")  # the families' configs take either name
DEFAULT_SEQ_LEN = 2048  # training sequence length of an import when max_position_embeddings is longer


def family_of(hf: dict[str, Any], where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HfFormatError(
            f"{where}: field 'model_type' = {model_type!r}: not a family Hecate converts (one of {sorted(FAMILIES)})"
        )
    return FAMILIES[model_type]


def hf_to_hecate(
    hf: dict[str, Any], where: str, seq_len: int | None = None
) -> tuple[ModelConfig, MoEConfig, int, Family]:
    """(model config, MoE config, vocabulary size, family) of a config.json; ``where`` names the file."""
    family = family_of(hf, where)
    field = _Reader(hf, where)
    field.require("hidden_act", "silu", "the experts' SwiGLU is silu(x w_gate) * x w_up")
    rope = hf.get("rope_parameters") or {}
    field.require_value("rope_parameters.rope_type", rope.get("rope_type", "default"), "default", "plain RoPE")
    field.require("rope_scaling", None, "plain RoPE")
    dim, heads = field.int("hidden_size"), field.int("num_attention_heads")
    head_dim = hf.get("head_dim") or dim // heads
    max_positions = field.int("max_position_embeddings")
    model = ModelConfig(
        dim=dim,
        n_layers=field.int("num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim * heads == dim else head_dim,
        seq_len=seq_len or min(max_positions, DEFAULT_SEQ_LEN),
        dense_ffn_dim=field.int("intermediate_size"),  # the expert size in the families without dense blocks
        dense_activation="swiglu",
        attention_bias=_attention_bias(family, field),
        qk_norm=family.qk_norm,
        norm_eps=float(field.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        vocab_size=field.int("vocab_size"),  # may be padded beyond the tokenizer's
    )
    moe = MoEConfig(
        num_experts=field.int(next((n for n in EXPERT_COUNT_FIELDS if n in hf), family.num_experts_field)),
        top_k=field.int("num_experts_per_tok"),
        ffn_dim=field.int(family.expert_ffn_field),
        activation="swiglu",
        renormalize=True if family is MIXTRAL else bool(hf.get("norm_topk_prob", False)),
    )
    if family is MIXTRAL:
        field.require("sliding_window", None, "attention over the whole sequence")
        if hf.get("router_jitter_noise", 0.0):
            field.refuse("router_jitter_noise", "multiplicative router noise is not implemented")
    if family.dense_blocks:
        field.require("use_sliding_window", False, "attention over the whole sequence")
        moe.every = field.int("decoder_sparse_step", 1)
        moe.first_moe_block = _first_moe_block(hf.get("mlp_only_layers") or [], field)
    if family.shared_expert and hf.get("shared_expert_intermediate_size", 0):
        moe.shared_experts, moe.shared_ffn_dim, moe.shared_gate = 1, field.int("shared_expert_intermediate_size"), True
    if family is OLMOE:
        field.require("clip_qkv", None, "q, k and v are not clipped")
    try:
        model.validate()
        moe.validate()
    except Exception as err:  # a value Hecate's model cannot take, named by its Hecate field
        raise HfFormatError(f"{where}: {err}") from None
    return model, moe, field.int("vocab_size"), family


def hecate_to_hf(model: ModelConfig, moe: MoEConfig, vocab_size: int) -> dict[str, Any]:
    """The config.json of the family that computes this model; refuses a model no family computes."""
    family = _export_family(model, moe)
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": model.dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "tie_word_embeddings": model.tie_embeddings,
        "num_experts_per_tok": moe.top_k,
        family.num_experts_field: moe.num_experts,
        family.expert_ffn_field: moe.ffn_dim,
        "dtype": "float32",
    }
    if family is MIXTRAL:
        hf.update(sliding_window=None, router_jitter_noise=0.0)
    else:
        hf["norm_topk_prob"] = moe.renormalize
    if family.dense_blocks:
        hf.update(
            intermediate_size=model.dense_ffn_dim,
            decoder_sparse_step=moe.every,
            mlp_only_layers=list(range(min(moe.first_moe_block, model.n_layers))),
            use_sliding_window=False,
        )
    if family is QWEN2_MOE:
        hf.update(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=model.attention_bias)
    if family in (QWEN3_MOE, OLMOE):
        hf["attention_bias"] = False
    return hf


def _export_family(model: ModelConfig, moe: MoEConfig) -> Family:
    """Which family has exactly this model's options; each refusal names the Hecate field."""
    family = {"full": OLMOE, "head": QWEN3_MOE}.get(model.qk_norm) or (QWEN2_MOE if moe.shared_experts else MIXTRAL)
    dense = any(not moe.is_moe_block(i) for i in range(model.n_layers))
    wants = [
        ("moe.activation", moe.activation == "swiglu", "the families' experts are SwiGLU"),
        ("moe.score", moe.score == "softmax", "the families' routers are softmax routers"),
        ("model.dense_activation", not dense or model.dense_activation == "swiglu", "their dense FFNs are SwiGLU"),
        ("moe.every", not dense or family.dense_blocks, f"{family.model_type} has an MoE FFN in every block"),
        ("moe.renormalize", family is not MIXTRAL or moe.renormalize, "mixtral renormalizes the top-k weights"),
        ("model.attention_bias", not model.attention_bias or family is QWEN2_MOE, f"{family.model_type} has none"),
        ("moe.shared_experts", moe.shared_experts <= 1, "Qwen2-MoE has one shared expert (of any size)"),
        ("moe.shared_gate", moe.shared_gate == bool(moe.shared_experts), "Qwen2-MoE's shared expert is gated"),
    ]
    if family is QWEN2_MOE and not moe.shared_experts:
        wants.append(("moe.shared_experts", False, "Qwen2-MoE has one"))
    if moe.shared_experts and family is not QWEN2_MOE:
        wants.append(("moe.shared_experts", False, f"{family.model_type} has no shared expert"))
    for name, ok, why in wants:
        if not ok:
            raise HfFormatError(f"--format hf: config field '{name}' has no Hugging Face equivalent here: {why}")
    return family


def _attention_bias(family: Family, field: _Reader) -> bool:
    if family is QWEN2_MOE:
        return bool(field.get("qkv_bias", True))  # older Qwen2-MoE configs have no field: always biased
    if family in (QWEN3_MOE, OLMOE) and field.get("attention_bias", False):
        field.refuse("attention_bias", "a bias on the output projection is not implemented (q/k/v biases are)")
    return False


def _first_moe_block(mlp_only_layers: list[int], field: _Reader) -> int:
    """Dense blocks are the first K ones in Hecate's model: mlp_only_layers must be [0, ..., K-1]."""
    if sorted(mlp_only_layers) != list(range(len(mlp_only_layers))):
        field.refuse("mlp_only_layers", "only the first blocks can be dense (e.g. [0, 1])")
    return len(mlp_only_layers)


class _Reader:
    """config.json fields, each refusal naming the file and field."""

    def __init__(self, hf: dict[str, Any], where: str):
        self.hf, self.where = hf, where

    def get(self, name: str, default: Any = None) -> Any:
        return self.hf.get(name, default)

    def int(self, name: str, default: int | None = None) -> int:
        value = self.hf.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.refuse(name, "must be an integer >= 1", value)
        return value

    def require(self, name: str, wanted: Any, why: str) -> None:
        self.require_value(name, self.hf.get(name, wanted), wanted, why)

    def require_value(self, name: str, value: Any, wanted: Any, why: str) -> None:
        if value != wanted:
            self.refuse(name, f"only {wanted!r} is supported ({why})", value)

    def refuse(self, name: str, why: str, value: Any = ...) -> None:
        value = self.hf.get(name) if value is ... else value
        raise HfFormatError(f"{self.where}: field '{name}' = {value!r}: {why}")
