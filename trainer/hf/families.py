"""The four Hugging Face families Hecate converts: what each names its MoE block and expert matrices, and which of
Hecate's model options it has. ``transformers`` is not imported: a family is its config.json and tensor names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0], what AutoModelForCausalLM builds
    moe_block: str  # the MoE FFN's module in a decoder layer: model.layers.N.<moe_block>
    expert_matrices: tuple[str, str, str]  # one expert's (gate, up, down) projections, each "<name>.weight"
    num_experts_field: str
    expert_ffn_field: str  # hidden size of one expert
    qk_norm: str  # Hecate's model.qk_norm this family has (always)
    shared_expert: bool  # a gated shared expert in every MoE block (Qwen2-MoE)
    dense_blocks: bool  # dense FFN blocks among the MoE ones (decoder_sparse_step, mlp_only_layers)


MIXTRAL = Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                 "num_local_experts", "intermediate_size", "none", False, False)  # fmt: skip
QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                   "num_experts", "moe_intermediate_size", "none", True, True)  # fmt: skip
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                   "num_experts", "moe_intermediate_size", "head", False, True)  # fmt: skip
OLMOE = Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
               "num_experts", "intermediate_size", "full", False, False)  # fmt: skip

FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)}
DENSE_MATRICES = ("gate_proj", "up_proj", "down_proj")  # a dense block's FFN and Qwen2-MoE's shared expert
