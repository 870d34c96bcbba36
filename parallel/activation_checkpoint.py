"""Activation checkpointing, applied from outside the model (``train.activation_checkpointing``): ``moe`` keeps
only each MoE layer's input and recomputes the layer in backward, ``block`` does so for each whole block. The
model's code is unchanged: each chosen module's ``forward`` is wrapped in PyTorch's non-reentrant checkpoint.

A recomputation runs the same collectives again (the token all-to-alls, the tensor-parallel gathers) in the same
order on every rank, since every rank's backward walks the same graph. What a forward counts (the expert rows
FSSDP computed, the routing trace) must not count twice: such code asks :func:`recomputing`. Under FSSDP the
recomputed forward reuses the expert replicas its first forward materialized (refilled by re-materialization
when that freed them), so a layer gathers no more often than its plan says.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from hecate.parallel.model_adapter import ModelAdapter

MODES = ("none", "moe", "block")
_state = threading.local()


def recomputing() -> bool:
    """Whether the forward running now is a checkpoint's recomputation in backward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recomputation(active: bool) -> Iterator[None]:
    before = recomputing()
    _state.recomputing = active or before
    try:
        yield
    finally:
        _state.recomputing = before


def checkpointed(forward: Callable) -> Callable:
    """``forward`` whose activations are recomputed in backward instead of kept."""

    def run(*args, **kwargs):
        calls = 0

        def body(*args, **kwargs):
            nonlocal calls
            calls += 1
            with _recomputation(calls > 1):
                return forward(*args, **kwargs)

        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, adapter: ModelAdapter, mode: str) -> list[nn.Module]:
    """Wrap the forward of every MoE layer (``moe``) or every block (``block``) this rank holds; returns them."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return []
    blocks = adapter.block_dict(model).values()
    if mode == "block":
        modules = list(blocks)
    else:
        modules = [layer for layer in adapter.moe_layers(model).values()]
    for module in modules:
        module.forward = checkpointed(module.forward)
    return modules
