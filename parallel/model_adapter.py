"""What ``parallel/`` knows about a model family: where its parts are, and how its attention splits over tp.

The parallel code never names a model's attributes; it asks an adapter, which a file beside each model builds
(``hecate.trainer.model_adapter`` for the project's Transformer). A new model family plugs in with one such file.
The model itself must accept what pipeline parallelism does to it: its forward skips an embedding, final norm or
head set to None (a stage's input is then activations, its output activations), and ``blocks`` is a ModuleDict
keyed by the global block index, so a stage keeps a slice of it with unchanged parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from hecate.collectives import Transport
from hecate.parallel.moe import MoE

# splits one block's attention over the tp ranks in place; returns the parameters now split, and how (see
# ``hecate.parallel.tensor_parallel.unsplit``)
SplitAttention = Callable[[nn.Module, Transport], dict[nn.Parameter, str]]


@dataclass(frozen=True)
class ModelAdapter:
    """Attribute names of a decoder-only model's parts, and its attention's tensor-parallel split."""

    blocks: str  # nn.ModuleDict of blocks keyed by global index
    embedding: str  # token embedding (nn.Embedding): the first pipeline stage holds it
    final_norm: str  # the last stage holds it and the head
    head: str  # LM head (nn.Linear without bias, or tied to the embedding's weight)
    attention: str  # in a block: the attention module
    ffn: str  # in a block: the FFN, an MoE layer or a dense FFN with w1, w2[, w3] (hecate.parallel.moe.ffn)
    split_attention: SplitAttention

    def block_dict(self, model: nn.Module) -> nn.ModuleDict:
        return getattr(model, self.blocks)

    def moe_layers(self, model: nn.Module) -> dict[int, MoE]:
        """The MoE layers by global block index."""
        return {
            int(i): getattr(b, self.ffn)
            for i, b in self.block_dict(model).items()
            if isinstance(getattr(b, self.ffn), MoE)
        }

    def tied(self, model: nn.Module) -> bool:
        """Whether the head's weight is the embedding's (read on the whole model, before any split)."""
        return getattr(model, self.head).weight is getattr(model, self.embedding).weight

    def dims(self, model: nn.Module) -> tuple[int, int]:
        """(vocabulary size, model dim), from the whole model's embedding."""
        return tuple(getattr(model, self.embedding).weight.shape)

    def head_weight_name(self) -> str:
        return f"{self.head}.weight"

    def embedding_weight_name(self) -> str:
        return f"{self.embedding}.weight"
