"""Where the parts of :class:`~hecate.trainer.model.Transformer` are, for ``parallel/``: the one file that ties this
model family to the parallel code (a new family adds a file like this one beside its model)."""

from hecate.parallel.model_adapter import ModelAdapter
from hecate.parallel.tensor_parallel import parallelize_fused_attention

TRANSFORMER = ModelAdapter(
    blocks="blocks",
    embedding="tok_emb",
    final_norm="norm",
    head="lm_head",
    attention="attn",
    ffn="ffn",
    split_attention=parallelize_fused_attention,
)
