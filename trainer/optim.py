"""AdamW with decay groups, a warmup + cosine learning-rate schedule, and gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from hecate.trainer.config import OptimConfig


def param_group_of(module: nn.Module, param_name: str) -> str:
    """Which decay group a parameter belongs to: 'norm', 'bias', 'embedding' or 'matrix'."""
    if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
        return "norm"
    if param_name.endswith("bias"):
        return "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "matrix"


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except the groups listed in ``optim.no_decay``.
    Tied weights appear once (in the group of the module that registers them first)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (no_decay if param_group_of(module, name) in cfg.no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.
    ``step`` counts from 0; a pure function of the step, so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
