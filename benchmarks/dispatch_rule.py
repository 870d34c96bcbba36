"""Question: which (token, expert) pairs should a replicated expert's copies compute - each source's own pairs on
its local copy first (the obvious rule), or quotas that level the devices' row totals first, locality second
(``parallel/moe/assignment.py``, what the dispatcher does)?

Pure arithmetic, no timing: the skew benchmark's routing (Zipf(s) popularity over a seeded permutation of 8
experts, top-2, 3,072 tokens per step; each rank's pair counts drawn from a multinomial with the exact
Plackett-Luce shares), the plan ``fssdp`` makes from the expected load (t = m = 2, and t = 4 > m = 1), and for each
rule the busiest device's expert rows over the mean (1.0 = level; expert parallelism's in the ``ep`` column).
Means over seeds.

    python benchmarks/dispatch_rule.py
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from skew import expected_share, zipf_weights

from hecate.parallel.fssdp import FssdpPolicy, initial_owners
from hecate.parallel.moe.assignment import rows_by_destination


def local_first(counts_PE: np.ndarray, holders: list[tuple[int, ...]]) -> np.ndarray:
    """rows_Q: a holder computes all its own pairs; a source without a copy splits its pairs evenly over the
    holders (the remainder to the first ones)."""
    ranks = counts_PE.shape[0]
    rows_Q = np.zeros(ranks, dtype=np.int64)
    for e, hs in enumerate(holders):
        for p in range(ranks):
            pairs = int(counts_PE[p, e])
            if p in hs:
                rows_Q[p] += pairs
                continue
            share, extra = divmod(pairs, len(hs))
            for i, q in enumerate(hs):
                rows_Q[q] += share + (i < extra)
    return rows_Q


def spread(rows_Q: np.ndarray) -> float:
    return float(rows_Q.max() / rows_Q.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.8, 1.2, 1.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--tokens", type=int, default=3072)
    args = parser.parse_args()
    experts, k = 8, 2
    print(f"{'ranks':>5} {'s':>4} {'budgets':>8} {'ep':>6} {'levelling first':>16} {'local first':>12}")
    for world in args.world_sizes:
        owner = initial_owners(experts, world)
        for s in args.exponents:
            for t, m in ((2, 2), (4, 1)):
                ep, level, local = [], [], []
                for seed in args.seeds:
                    share_E = np.array(expected_share(zipf_weights(experts, s, seed), k))
                    rng = np.random.default_rng(seed)
                    counts_PE = np.stack([rng.multinomial(args.tokens * k // world, share_E) for _ in range(world)])
                    plan = FssdpPolicy(t, m).materialize(owner, (share_E * args.tokens * k).tolist())
                    ep.append(spread(rows_by_destination(counts_PE, [(o,) for o in owner.owner_C]).sum(0)))
                    level.append(spread(rows_by_destination(counts_PE, plan.devices_C).sum(0)))
                    local.append(spread(local_first(counts_PE, list(plan.devices_C))))
                print(
                    f"{world:>5} {s:>4} {f't={t} m={m}':>8} {statistics.mean(ep):>6.3f} "
                    f"{statistics.mean(level):>16.3f} {statistics.mean(local):>12.3f}"
                )


if __name__ == "__main__":
    main()
