"""Routing traces: per step, per MoE layer, per source rank, the (token, expert) pairs the router sent to each
expert - what the scale simulator replays (``hecate train --record-routing``).

Why per source rank and not the global counts of ``metrics.jsonl``: the all-to-all bytes and the dispatcher's
choice of replica depend on where each pair starts, and real ranks do not route alike.

File format (``routing_trace.bin`` in the run folder), compact, append-only, no pickle:
  line 1: a JSON header ending in ``\\n``: {"format": "hecate-routing-trace", "version": 1, "ranks": R,
          "layers": [block indices], "experts": E, "top_k": K, "tokens_per_rank": T}
  then one record per step: little-endian int32 ``[step, counts_RLE...]`` (1 + R * L * E values).
A record of a step already in the file replaces it when read (a resumed run writes its steps again).

Shapes: S steps, L MoE layers, R source ranks, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hecate.parallel.activation_checkpoint import recomputing
from hecate.trainer.errors import DataError

TRACE_FILE = "routing_trace.bin"
FORMAT, VERSION = "hecate-routing-trace", 1
RECORD_DTYPE = np.dtype("<i4")
MAX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class RoutingTrace:
    """A whole trace in memory: ``counts_SLRE[s, l, r, e]`` pairs of source rank r to expert e."""

    steps_S: np.ndarray  # int64, the training step of each record (1-based, as in metrics.jsonl)
    counts_SLRE: np.ndarray  # int64
    layers: tuple[int, ...]  # block index of each MoE layer
    top_k: int
    tokens_per_rank: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.counts_SLRE.shape)  # type: ignore[return-value]


def header_for(ranks: int, layers: list[int], experts: int, top_k: int, tokens_per_rank: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "ranks": ranks,
        "layers": list(layers),
        "experts": experts,
        "top_k": top_k,
        "tokens_per_rank": tokens_per_rank,
    }


def write_trace(path: Path, trace: RoutingTrace) -> None:
    """Write a whole trace (e.g. one recorded by a benchmark) in the file format above."""
    steps, layers, ranks, experts = trace.shape
    header = header_for(ranks, list(trace.layers), experts, trace.top_k, trace.tokens_per_rank)
    records = np.concatenate(
        [trace.steps_S.reshape(steps, 1), trace.counts_SLRE.transpose(0, 2, 1, 3).reshape(steps, -1)], axis=1
    )
    path.write_bytes((json.dumps(header) + "\n").encode() + records.astype(RECORD_DTYPE).tobytes())


def read_trace(path: str | Path) -> RoutingTrace:
    """Read and check a trace file; a damaged or foreign file raises DataError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"routing trace {str(path)!r} does not exist (record one with hecate train --record-routing)")
    raw = path.read_bytes()
    end = raw.find(b"\n", 0, MAX_HEADER_BYTES)
    try:
        header = json.loads(raw[:end]) if end > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path} is not a routing trace (its first line is not a {FORMAT} JSON header)")
    if header.get("version") != VERSION:
        raise DataError(f"{path}: routing trace version {header.get('version')!r}, this reader knows {VERSION}")
    ranks, layers, experts = int(header["ranks"]), list(header["layers"]), int(header["experts"])
    width = 1 + ranks * len(layers) * experts
    body = raw[end + 1 :]
    if len(body) % (width * RECORD_DTYPE.itemsize):
        raise DataError(
            f"{path}: {len(body)} bytes of records is not a whole number of {width}-value records "
            f"(the file was cut short)"
        )
    records = np.frombuffer(body, dtype=RECORD_DTYPE).reshape(-1, width).astype(np.int64)
    if not len(records):
        raise DataError(f"{path} holds no steps")
    last = {int(step): i for i, step in enumerate(records[:, 0])}  # a rewritten step replaces the earlier one
    records = records[[last[s] for s in sorted(last)]]
    counts_SRLE = records[:, 1:].reshape(-1, ranks, len(layers), experts)
    if (counts_SRLE < 0).any():
        raise DataError(f"{path}: negative expert counts")
    return RoutingTrace(
        records[:, 0],
        counts_SRLE.transpose(0, 2, 1, 3).copy(),
        tuple(layers),
        int(header["top_k"]),
        int(header["tokens_per_rank"]),
    )


class RoutingRecorder:
    """Counts each MoE layer's local pairs per expert during a training step (a forward hook on the router) and,
    after the step, gathers them over the data-parallel ranks; the main rank appends one record to the file.
    ``moe_layers`` maps block index -> MoE layer; ``dp`` is the data-parallel transport (None on one process)."""

    def __init__(
        self, path: Path, moe_layers: dict, dp: Any, tokens_per_rank: int, is_main: bool, resume_step: int = 0
    ):
        self.path, self.dp, self.is_main = path, dp, is_main
        self.layers = sorted(moe_layers)
        first = moe_layers[self.layers[0]]
        self.experts, self.top_k = first.cfg.num_experts, first.cfg.top_k
        self.ranks = dp.world_size if dp is not None else 1
        self.counts_LE = torch.zeros(len(self.layers), self.experts, dtype=torch.long, device="cpu")
        for row, index in enumerate(self.layers):
            moe_layers[index].router.register_forward_hook(
                lambda module, _args, routing, row=row: self._count(module, row, routing)
            )
        if is_main:
            self._start_file(
                header_for(self.ranks, self.layers, self.experts, self.top_k, tokens_per_rank), resume_step
            )

    def _count(self, module: torch.nn.Module, row: int, routing: Any) -> None:
        if module.training and not recomputing():  # an activation checkpoint's recomputation routes again
            self.counts_LE[row] += torch.bincount(routing.experts_TK.flatten(), minlength=self.experts).cpu()

    def _start_file(self, header: dict[str, Any], resume_step: int) -> None:
        """A fresh file, or on resume the old one cut after ``resume_step`` (if its header matches)."""
        if resume_step and self.path.is_file():
            old = read_trace(self.path)
            same = old.shape[1:] == (len(self.layers), self.ranks, self.experts) and old.top_k == self.top_k
            if same:
                keep = old.steps_S <= resume_step
                write_trace(
                    self.path,
                    RoutingTrace(old.steps_S[keep], old.counts_SLRE[keep], old.layers, old.top_k, old.tokens_per_rank),
                )
                return
        self.path.write_bytes((json.dumps(header) + "\n").encode())

    def end_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): gather every rank's counts (collective) and append them."""
        local = self.counts_LE.flatten()
        if self.ranks > 1:
            gathered = local.new_empty(self.ranks * local.numel())
            self.dp.all_gather(gathered, local, name="routing_trace").wait()
        else:
            gathered = local
        self.counts_LE.zero_()
        if self.is_main:
            record = torch.cat([torch.tensor([step]), gathered]).numpy().astype(RECORD_DTYPE)
            with self.path.open("ab") as out:
                out.write(record.tobytes())
