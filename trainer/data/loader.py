"""Loaders: the batches a step trains on and the windows validation scores.

Legend: N = tokens in a split, G = global_batch (rows per optimizer step, all ranks and micro-batches),
B = rows of one micro-batch on one rank, S = seq_len, R = validation rows.

Training windows are drawn from a generator seeded by (seed, step) alone; a rank takes a fixed slice of the
G rows of its step, micro-batch m and rank r holding rows [(m * dp_size + r) * B, ... + B). So every
layout (dp_size x grad_accum) trains on the same global rows, and resuming needs nothing but the step.
Validation windows are consecutive and disjoint, the same rows for every layout, split across ranks.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hecate.collectives.errors import ConfigError

from hecate.trainer.errors import DataError
from hecate.trainer.data.manifest import load_manifest, longest_document
from hecate.trainer.data.shards import ShardedTokens, open_tokens


class TrainLoader:
    """Random windows of the train split; ``batch(step, micro)`` is a pure function of (seed, step, micro, rank)."""

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, global_batch: int, grad_accum: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if global_batch % (grad_accum * dp_size):
            raise ConfigError("train.global_batch", f"must be a multiple of train.grad_accum ({grad_accum}) x "
                                                    f"data-parallel ranks ({dp_size}) = {grad_accum * dp_size}, "
                                                    f"got {global_batch}")
        _check_rank(dp_rank, dp_size)
        if seed < 0:
            raise ConfigError("train.seed", f"must be >= 0, got {seed}")
        manifest = load_manifest(data_dir)
        longest = longest_document(manifest)
        if seq_len > longest:
            raise DataError(f"model.seq_len={seq_len} is longer than the longest document of {data_dir} "
                            f"({longest} tokens): every window would span several documents; "
                            f"use model.seq_len <= {longest}")
        self.tokens_N = open_tokens(data_dir, manifest, "train")
        _check_fits(seq_len, self.tokens_N.size, "train")
        self.seq_len, self.global_batch, self.grad_accum = seq_len, global_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.rows = global_batch // (grad_accum * dp_size)  # B
        self.step = 0  # the next step ``next()`` returns

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BS, targets_BS) int64 of micro-batch ``micro`` of ``step`` on this rank."""
        if not 0 <= micro < self.grad_accum:
            raise IndexError(f"micro-batch {micro} of {self.grad_accum}")
        rng = np.random.default_rng([self.seed, step])
        starts_G = rng.integers(0, self.tokens_N.size - self.seq_len, size=self.global_batch)
        first = (micro * self.dp_size + self.dp_rank) * self.rows
        return _windows(self.tokens_N, starts_G[first:first + self.rows], self.seq_len)

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of the next step."""
        micro_batches = [self.batch(self.step, micro) for micro in range(self.grad_accum)]
        self.step += 1
        return micro_batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class ValLoader:
    """The first ``max_batches * batch_size`` consecutive windows of the val split, in batches of
    ``batch_size`` rows over all ranks; each rank gets a contiguous ``batch_size / dp_size`` of every batch.
    The rows are cut to a multiple of ``dp_size`` so that every rank scores the same number."""

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, max_batches: int,
                 dp_rank: int = 0, dp_size: int = 1):
        _check_rank(dp_rank, dp_size)
        if batch_size % dp_size:
            raise ConfigError("train.global_batch", f"the validation batch of {batch_size} rows must split evenly "
                                                    f"over {dp_size} data-parallel ranks")
        manifest = load_manifest(data_dir)
        self.tokens_N = open_tokens(data_dir, manifest, "val")
        _check_fits(seq_len, self.tokens_N.size, "val")
        windows = (self.tokens_N.size - 1) // seq_len
        if windows < dp_size:
            raise DataError(f"the val split of {data_dir} holds {windows} window(s) of model.seq_len={seq_len}, "
                            f"fewer than the {dp_size} data-parallel ranks that each score at least one; "
                            f"lower model.seq_len or hold out more files (data.val_fraction)")
        rows = min(windows, max_batches * batch_size)
        self.rows = rows - rows % dp_size  # R
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size = seq_len, batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.rows, self.batch_size):
            per_rank = min(self.batch_size, self.rows - first) // self.dp_size
            mine = first + self.dp_rank * per_rank
            starts_B = np.arange(mine, mine + per_rank) * self.seq_len
            yield _windows(self.tokens_N, starts_B, self.seq_len)


def _windows(tokens_N: ShardedTokens, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, targets_BS): windows of seq_len + 1 tokens from ``starts_B``, targets shifted by one."""
    windows_BS1 = torch.from_numpy(tokens_N.take(starts_B[:, None] + np.arange(seq_len + 1)).astype(np.int64))
    return windows_BS1[:, :-1].contiguous(), windows_BS1[:, 1:].contiguous()


def _check_fits(seq_len: int, tokens: int, split: str) -> None:
    if seq_len < 1:
        raise ConfigError("model.seq_len", f"must be >= 1, got {seq_len}")
    if tokens < seq_len + 1:
        raise DataError(f"model.seq_len={seq_len} needs windows of {seq_len + 1} tokens, but the {split} split "
                        f"has only {tokens} tokens; lower model.seq_len or add text to the corpus")


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError("parallel.dp", f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
