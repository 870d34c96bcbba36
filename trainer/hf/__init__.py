"""Hugging Face model folders in and out: ``hecate import-hf`` and ``hecate export --format hf``.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (``config.json`` ``model_type``). One idea per file:
:mod:`.families` (each family's config fields and tensor names), :mod:`.config_map` (their config.json <-> the
model and MoE config), :mod:`.tensors` (tensor layouts: stacked experts, fused q/k/v, the RoPE row order),
:mod:`.reader` (lazy, checked reading of sharded safetensors), :mod:`.importer` and :mod:`.exporter`.

RoPE: transformers rotates the two halves of each head (``rotate_half``: feature i pairs with i + Dh/2); Hecate's
model rotates interleaved (even, odd) pairs. The conversion permutes the rows of the q and k projections (and of
their biases and q/k norm weights) so that Hecate's pair (2i, 2i+1) holds transformers' features (i, i + Dh/2):
the same function, no option in the model. Export applies the inverse permutation.
"""
