"""Where the simulated tokens go: per step and MoE layer, the pairs each source rank sends to each expert.

Two sources, one interface (``counts_RE(step, layer, ranks, pairs_per_rank)``):
- ``TraceRouting`` replays a recorded trace (:mod:`.trace`), from its ``skip``-th step on (``--trace-skip``:
  leave out the steps right after initialisation). A cluster larger than the recording reuses the
  recorded ranks in turn (simulated rank r routes like recorded rank r mod R), and layer l like recorded layer
  l mod L; each row is rescaled to the simulated pairs per rank (largest remainder, so totals are exact). The
  expert count must match: a 64-expert model is simulated from a 64-expert trace, never from a resampled one.
- ``ZipfRouting``: expert popularity Zipf(s) over a seeded random permutation per layer (the hot experts of
  different layers differ, as in trained models); each rank's pairs are a multinomial draw, seeded by
  (seed, step, layer), so runs repeat exactly.

Shapes: R source ranks, E experts.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from hecate.collectives.errors import ConfigError
from hecate.trainer.errors import DataError
from hecate.trainer.routing_trace import RoutingTrace


class Routing(Protocol):
    num_experts: int
    steps: int

    def counts_RE(self, step: int, layer: int, ranks: int, pairs_per_rank: int) -> np.ndarray: ...


def rescale_rows(counts_RE: np.ndarray, total: int) -> np.ndarray:
    """Each row scaled to sum to ``total`` with the largest-remainder rule (ties to the lower expert index)."""
    counts_RE = np.asarray(counts_RE, dtype=np.float64)
    sums_R = counts_RE.sum(axis=1, keepdims=True)
    shares_RE = np.where(sums_R > 0, counts_RE / np.where(sums_R > 0, sums_R, 1), 1.0 / counts_RE.shape[1])
    exact_RE = shares_RE * total
    out_RE = np.floor(exact_RE).astype(np.int64)
    short_R = total - out_RE.sum(axis=1)
    for r, short in enumerate(short_R):
        if short:
            order = np.lexsort((np.arange(counts_RE.shape[1]), -(exact_RE[r] - out_RE[r])))
            out_RE[r, order[:short]] += 1
    return out_RE


class TraceRouting:
    """Replays a recorded trace on any number of ranks (see the module docstring)."""

    def __init__(self, trace: RoutingTrace, num_experts: int, num_layers: int, skip: int = 0):
        steps, layers, ranks, experts = trace.shape
        if experts != num_experts:
            raise DataError(
                f"the routing trace has {experts} experts per layer but the model config has "
                f"moe.num_experts={num_experts}: record a trace of a {num_experts}-expert model"
            )
        if not 0 <= skip < steps:
            raise ConfigError("--trace-skip", f"must be in [0, {steps}) for a trace of {steps} steps, got {skip}")
        self.trace, self.num_experts, self.steps = trace, num_experts, steps
        self.num_layers, self.skip = num_layers, skip

    def counts_RE(self, step: int, layer: int, ranks: int, pairs_per_rank: int) -> np.ndarray:
        """Simulated step 0 replays recorded step ``skip`` (routing right after initialisation is not the
        routing of a trained model); the replay wraps around to the first recorded step."""
        counts_SLRE = self.trace.counts_SLRE
        recorded_RE = counts_SLRE[(self.skip + step) % self.steps, layer % counts_SLRE.shape[1]]
        rows_RE = recorded_RE[np.arange(ranks) % recorded_RE.shape[0]]
        return rescale_rows(rows_RE, pairs_per_rank)


def zipf_popularity(num_experts: int, s: float, seed: int) -> np.ndarray:
    """The i-th most popular expert (a seeded random permutation) has weight 1 / i**s; normalised."""
    order = np.random.default_rng(seed).permutation(num_experts)
    weights_E = np.empty(num_experts)
    weights_E[order] = 1.0 / np.arange(1, num_experts + 1) ** s
    return weights_E / weights_E.sum()


class ZipfRouting:
    """Synthetic skew: Zipf(s) popularity per layer, multinomial pairs per rank (see the module docstring)."""

    def __init__(self, s: float, num_experts: int, num_layers: int, steps: int, seed: int = 0):
        if not s >= 0:
            raise ConfigError("--zipf", f"the Zipf exponent must be >= 0 (0 = uniform), got {s}")
        self.s, self.num_experts, self.steps, self.seed = s, num_experts, steps, seed
        self.popularity_LE = np.stack(
            [zipf_popularity(num_experts, s, seed * 1009 + layer) for layer in range(num_layers)]
        )

    def counts_RE(self, step: int, layer: int, ranks: int, pairs_per_rank: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, step, layer))
        return rng.multinomial(pairs_per_rank, self.popularity_LE[layer], size=ranks).astype(np.int64)
