"""Question: when routing is skewed, what does one MoE block's training step cost under each expert placement
policy - ``ep``, ``fsdp``, ``shadow``, ``fssdp`` and ``fssdp`` with re-materialization (``fssdp-rm``) - in
time, bytes moved, rows per device and memory?

One block (a causal self-attention, then the MoE layer, both residual) on 2 and 4 simulated ranks, each rank
with its own tokens. The router keeps its gate (so there is a gradient path) but the experts are forced: each
token draws k distinct experts from a popularity distribution (Plackett-Luce, i.e. Gumbel top-k on the log
popularity), with a generator seeded by (seed, step, rank), so every policy sees exactly the same routing.
Popularity is Zipf(s) over a seeded random permutation of the experts, or the replay of the demo run's recorded
per-expert loads (``runs/tiny/metrics.jsonl``, one layer, mean of the last steps), the draw weights calibrated
so that the expected pairs per expert equal the recorded ones. Router counts are summed over the group, so the
FSSDP engine plans from the same global load on every rank.

Each rank's tokens are its share of a fixed global batch (``--tokens``), so every world size puts the same work
on the machine. All policies of one routing scenario run in the same worker processes, each with its own block
(same initial weights), engine and byte counters, taking turns step by step so that the machine's background
load falls on all of them alike. A configuration's step time is the median over the measured steps of the slowest
rank's forward + backward; its ratio to ``ep`` is the median of the per-round ratios (the two steps ran back to
back). Bytes are per step, summed over ranks, from the transport's accounting; the benchmark asserts that the
sparse collectives moved exactly the plans' replicas x expert bytes. Peak memory is the largest, over ranks, of
the live tensor bytes at the peak of one extra step traced with ``torch.distributed._tools.mem_tracker.MemTracker``
(parameters, activations, temporaries, received replicas; the allocator's own overhead is not in it).

    python benchmarks/skew.py --json runs/skew.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from hecate.collectives import CommStats, TorchTransport, delta
from hecate.parallel.config import FssdpConfig, MoEConfig
from hecate.parallel.data_parallel import router_sums_reduce
from hecate.parallel.expert_sharding import FullySharded
from hecate.parallel.fssdp import initial_owners
from hecate.parallel.moe import MoE
from hecate.parallel.moe.router import Routing

POLICIES = {  # name: FssdpConfig fields (the budgets default to --overlap-budget / --memory-budget)
    "ep": {"policy": "ep"},
    "fsdp": {"policy": "fsdp"},
    "shadow": {"policy": "shadow"},
    "fssdp": {"policy": "fssdp"},
    "fssdp-rm": {"policy": "fssdp", "rematerialize": True},
    # memory scarcer than overlap (t > m): the planner's load-proportional branch against shadowing with as much
    "shadow-m1": {"policy": "shadow", "memory_budget": 1},
    "fssdp-t4m1": {"policy": "fssdp", "overlap_budget": 4, "memory_budget": 1},
    "fssdp-t4m2": {"policy": "fssdp", "overlap_budget": 4, "memory_budget": 2},
    # budgets derived from the engine's measurements (attention time, gather bandwidth, free memory)
    "fssdp-auto": {"policy": "fssdp", "overlap_budget": "auto", "memory_budget": "auto"},
}
DEFAULT_POLICIES = ("ep", "fsdp", "shadow", "fssdp", "fssdp-rm", "fssdp-auto")
TOKEN_OPS = ("moe.dispatch", "moe.dispatch.backward", "moe.combine", "moe.combine.backward")


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (2, 4)
    exponents: tuple[float, ...] = (0.0, 0.8, 1.2, 1.6)
    seeds: tuple[int, ...] = (0, 1, 2)
    replay_layers: tuple[int, ...] = (0,)
    replay_steps: int = 50
    metrics: str = "runs/tiny/metrics.jsonl"
    policies: tuple[str, ...] = DEFAULT_POLICIES
    dim: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    experts: int = 8
    top_k: int = 2
    tokens: int = 3072  # per step over all ranks (the same work on the machine for every world size)
    seq: int = 256  # each rank's tokens are [tokens / (seq * ranks), seq]
    window: int = 5
    overlap_budget: int = 2
    memory_budget: int = 2
    warmup: int = 5  # >= window, so that the load estimate is full when timing starts
    iters: int = 10


@dataclass(frozen=True)
class Scenario:
    """One routing distribution: ``weights_E`` are the Plackett-Luce draw weights (popularity)."""

    label: str  # "zipf" or "replay"
    s: float | None  # Zipf exponent; None for a replay
    layer: int | None  # replayed layer; None for Zipf
    seed: int
    weights_E: tuple[float, ...] = field(repr=False)


# ---- routing ----------------------------------------------------------------------------------------------


def zipf_weights(experts: int, s: float, seed: int) -> list[float]:
    """Zipf(s) popularity: the i-th most popular expert (a seeded random permutation) has weight 1 / i**s."""
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(seed)).tolist()
    weights = [0.0] * experts
    for place, expert in enumerate(order):
        weights[expert] = 1.0 / (place + 1) ** s
    return weights


def expected_share(weights_E: list[float], k: int) -> list[float]:
    """Expected fraction of (token, k) pairs per expert when k distinct experts are drawn one after another,
    each with probability proportional to its weight among those left (exact, over the E!/(E-k)! sequences)."""
    total = sum(weights_E)
    share = [0.0] * len(weights_E)
    for sequence in itertools.permutations(range(len(weights_E)), k):
        probability, left = 1.0, total
        for expert in sequence:
            probability *= weights_E[expert] / left
            left -= weights_E[expert]
        for expert in sequence:
            share[expert] += probability / k
    return share


def calibrated_weights(target_E: list[float], k: int, rounds: int = 200) -> list[float]:
    """Draw weights whose expected pair shares equal ``target_E`` (normalised), by fixed-point iteration."""
    target = [t / sum(target_E) for t in target_E]
    weights = list(target)
    for _ in range(rounds):
        share = expected_share(weights, k)
        weights = [w * t / g for w, t, g in zip(weights, target, share)]
    return weights


def recorded_load(metrics: Path, layer: int, steps: int) -> list[float]:
    """Per-expert pairs of ``layer`` averaged over the last ``steps`` training steps of a run's metrics."""
    loads = [
        json.loads(line)["expert_load"][str(layer)]
        for line in metrics.read_text().splitlines()
        if '"expert_load"' in line
    ]
    if len(loads) < steps:
        raise SystemExit(f"{metrics} has {len(loads)} steps with expert_load, fewer than --replay-steps={steps}")
    return [sum(step[e] for step in loads[-steps:]) / steps for e in range(len(loads[-1]))]


class ForcedRouter(nn.Module):
    """The real gate's logits and probabilities, but experts drawn from fixed popularity weights; the combine
    weights are a softmax of the gate's logits over the drawn experts (so the gate still gets a gradient)."""

    def __init__(self, gate: nn.Linear, weights_E: tuple[float, ...], top_k: int, seed: int, rank: int):
        super().__init__()
        self.gate = gate
        self.register_buffer("log_weights_E", torch.tensor(weights_E, dtype=torch.float64).log())
        self.top_k, self.seed, self.rank = top_k, seed, rank
        self.draws = 0

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = x_TD.float() @ self.gate.weight.float().t()
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) * 1009 + self.rank)
        self.draws += 1
        uniform_TE = torch.rand(logits_TE.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        gumbel_TE = -(-uniform_TE.log()).log()
        experts_TK = (self.log_weights_E + gumbel_TE).topk(self.top_k, dim=-1).indices
        weights_TK = torch.softmax(logits_TE.gather(-1, experts_TK), dim=-1)
        return Routing(experts_TK, weights_TK, torch.softmax(logits_TE, dim=-1), logits_TE)


# ---- the block --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """x + attention(x), then h + moe(h). The FSSDP engine gathers replicas in a pre-hook on this module, so
    the gather overlaps the attention."""

    def __init__(self, config: Config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        moe = MoEConfig(
            num_experts=config.experts, top_k=config.top_k, ffn_dim=config.ffn_dim, aux_loss_coef=0.0, z_loss_coef=0.0
        )
        self.moe = MoE(config.dim, moe, init_std=0.02)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x_BSD.shape
        qkv = self.qkv(x_BSD).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        h_BSD = x_BSD + self.out(attn.transpose(1, 2).reshape(batch, seq, dim))
        return h_BSD + self.moe(h_BSD)


# ---- one rank -----------------------------------------------------------------------------------------------


class PolicyRun:
    """One policy's block, engine and transport (with its own byte counts) on this rank."""

    def __init__(self, config: Config, scenario: Scenario, policy: str):
        self.transport = TorchTransport(None, CommStats())  # the world group; counts bytes for this policy only
        rank, world = self.transport.rank, self.transport.world_size
        torch.manual_seed(0)  # the same block under every policy
        self.block = Block(config)
        moe = self.block.moe
        moe.router = ForcedRouter(moe.router.gate, scenario.weights_E, config.top_k, scenario.seed, rank)
        moe.reduce = router_sums_reduce(self.transport)  # global counts: every rank plans the same
        sharding = FullySharded(
            self.transport,
            FssdpConfig(
                **{
                    "window": config.window,
                    "overlap_budget": config.overlap_budget,
                    "memory_budget": config.memory_budget,
                    **POLICIES[policy],
                }
            ),
        )
        sharding.wrap(self.block)
        self.engine = sharding.engine
        (self.layer,) = self.engine.layers.values()
        self.optimizer = torch.optim.SGD(self.block.parameters(), lr=0.0)
        self.x_BSD = torch.randn(
            config.tokens // (config.seq * world),
            config.seq,
            config.dim,
            generator=torch.Generator().manual_seed(1000 + rank),
        )
        self.times: list[float] = []
        self.rows: list[int] = []
        self.counts: list[list[int]] = []
        self.held: list[int] = []
        self.budgets: list[tuple[int, int]] = []

    def step(self) -> float:
        """One training step; returns the slowest rank's forward + backward seconds."""
        self.transport.barrier(name="bench.barrier").wait()
        start = time.perf_counter()
        self.block(self.x_BSD).square().mean().backward()
        seconds = time.perf_counter() - start
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.end_step(self.optimizer)
        slowest = torch.tensor([seconds], dtype=torch.float64)
        self.transport.all_reduce(slowest, reduce="max", name="bench.timing").wait()
        return slowest.item()

    def measured_step(self) -> None:
        self.held.append(len(self.layer.materialized.chunks_on(self.transport.rank)))
        self.budgets.append(self.layer.budgets)
        self.times.append(self.step())
        self.rows.append(self.layer.last_rows)
        self.counts.append(self.block.moe.stats.counts_E.tolist())  # global: summed over the group

    def peak_memory(self) -> dict[str, int]:
        """Bytes of live tensors at the peak of one more step, by kind (parameters, activations, ...)."""
        tracker = MemTracker()
        tracker.track_external(self.block, self.optimizer, self.x_BSD)
        with tracker:
            self.step()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]


def measure(config: Config, scenario: Scenario) -> list[dict]:
    """This rank's figures for every policy under one routing scenario. The policies take turns step by step, so
    that the machine's background load falls on all of them alike; unless the routing is already uniform, ``ep``
    under uniform routing (Zipf s = 0, the goals' reference) takes its turn too."""
    runs = [PolicyRun(config, scenario, policy) for policy in config.policies]
    uniform = Scenario("zipf", 0.0, None, scenario.seed, (1.0,) * config.experts)
    reference = None if scenario.s == 0.0 else PolicyRun(config, uniform, "ep")
    rotation = runs + ([reference] if reference else [])
    for _ in range(config.warmup):
        for run in rotation:
            run.step()
    before = [run.transport.stats.snapshot() for run in runs]
    for _ in range(config.iters):
        for run in rotation:
            run.measured_step()
    if reference is None and "ep" in config.policies:
        reference = runs[config.policies.index("ep")]
    reference_times = reference.times if reference is not None else None
    results = []
    for run, start in zip(runs, before):
        ops = delta(run.transport.stats.snapshot(), start)
        per_step = lambda names, ops=ops: sum(ops[n].bytes_sent for n in names if n in ops) / config.iters  # noqa: E731
        gather, reduce_scatter = ops.get("sparse_all_gather"), ops.get("sparse_reduce_scatter")
        results.append(
            {
                "times": run.times,
                "rows": run.rows,
                "counts": run.counts,
                "held": run.held,
                "budgets": run.budgets,
                "chunk_bytes": run.layer.spec.nbytes,
                "gather_bytes": per_step(["sparse_all_gather"]),
                "reduce_scatter_bytes": per_step(["sparse_reduce_scatter"]),
                "token_bytes": per_step(TOKEN_OPS),
                "gather_wait_ms": 1e3 * gather.wait_s / config.iters if gather else 0.0,
                "reduce_scatter_wait_ms": 1e3 * reduce_scatter.wait_s / config.iters if reduce_scatter else 0.0,
                "peak": run.peak_memory(),
                "reference_times": reference_times,
            }
        )
    return results


def worker(config: Config, scenarios: list[Scenario]) -> list[dict]:
    return [result for scenario in scenarios for result in measure(config, scenario)]


# ---- the parent: scenarios, aggregation, tables -------------------------------------------------------------


def scenarios(config: Config) -> list[Scenario]:
    out = [
        Scenario("zipf", s, None, seed, tuple(zipf_weights(config.experts, s, seed)))
        for s in config.exponents
        for seed in config.seeds
    ]
    for layer in config.replay_layers:
        weights = calibrated_weights(recorded_load(Path(config.metrics), layer, config.replay_steps), config.top_k)
        out += [Scenario("replay", None, layer, seed, tuple(weights)) for seed in config.seeds]
    return out


def ideal_ratio(counts_E: list[float], world: int) -> float:
    """Balanced share / expert parallelism's largest device share: the step-time ratio to ``ep`` that perfect
    balancing of the expert rows would reach if expert compute were all of the step."""
    owner = initial_owners(len(counts_E), world).owner_C
    per_device = [sum(c for e, c in enumerate(counts_E) if owner[e] == d) for d in range(world)]
    return (sum(counts_E) / world) / max(per_device)


def summarize(config: Config, world: int, scenario: Scenario, policy: str, per_rank: list[dict]) -> dict:
    """One JSON object: a (world size, routing, seed, policy) configuration's figures, bytes summed over ranks."""
    steps = range(config.iters)
    reference = per_rank[0]["reference_times"]
    rows_max_mean = [
        max(r["rows"][i] for r in per_rank) / statistics.mean(r["rows"][i] for r in per_rank) for i in steps
    ]
    counts = per_rank[0]["counts"]
    peak_rank = max(per_rank, key=lambda r: r["peak"]["Total"])["peak"]
    gather, reduce_scatter = (sum(r[f] for r in per_rank) for f in ("gather_bytes", "reduce_scatter_bytes"))
    tokens = sum(r["token_bytes"] for r in per_rank)
    replicas = sum(h - config.experts // world for r in per_rank for h in r["held"]) / config.iters
    chunk = per_rank[0]["chunk_bytes"]
    gathers = 2 if POLICIES[policy].get("rematerialize") else 1  # RM gathers again in backward
    planned = (gathers * replicas * chunk, replicas * chunk)
    probes = "auto" in POLICIES[policy].values()  # the engine's bandwidth probes are gathers too
    exact = (gather >= planned[0] and reduce_scatter == planned[1]) if probes else (gather, reduce_scatter) == planned
    if not exact:
        raise AssertionError(
            f"{policy} on {world} ranks ({scenario}): gather moved {gather} and reduce-scatter "
            f"{reduce_scatter} bytes per step, the plans' {replicas} replicas x {chunk} bytes "
            f"call for {gathers * replicas * chunk} and {replicas * chunk}"
        )
    return {
        "world_size": world,
        "routing": scenario.label,
        "s": scenario.s,
        "replay_layer": scenario.layer,
        "seed": scenario.seed,
        "policy": policy,
        "step_ms": round(1e3 * statistics.median(per_rank[0]["times"]), 2),
        "times_ms": [round(1e3 * t, 2) for t in per_rank[0]["times"]],
        "ratio_to_ep_uniform": (
            round(statistics.median(t / b for t, b in zip(per_rank[0]["times"], reference)), 3) if reference else None
        ),
        "gather_bytes": round(gather),
        "reduce_scatter_bytes": round(reduce_scatter),
        "token_bytes": round(tokens),
        "expert_bytes": round(gather + reduce_scatter),
        "total_bytes": round(gather + reduce_scatter + tokens),
        "rows_max_over_mean": round(statistics.mean(rows_max_mean), 3),
        "rows_max": round(statistics.mean(max(r["rows"][i] for r in per_rank) for i in steps)),
        "pairs_per_step": round(statistics.mean(sum(c) for c in counts)),
        "hottest_share": round(statistics.mean(max(c) / sum(c) for c in counts), 3),
        "ideal_ratio": round(statistics.mean(ideal_ratio(c, world) for c in counts), 3),
        "peak_mib": round(peak_rank["Total"] / 2**20, 1),
        "peak_by_kind_mib": {k: round(v / 2**20, 1) for k, v in peak_rank.items() if k != "Total" and v},
        "replicas": replicas,
        "expert_mib_held": round(
            statistics.mean(max(r["held"][i] for r in per_rank) for i in steps) * chunk / 2**20, 1
        ),
        "gather_wait_ms": round(max(r["gather_wait_ms"] for r in per_rank), 2),
        "reduce_scatter_wait_ms": round(max(r["reduce_scatter_wait_ms"] for r in per_rank), 2),
        "overlap_budget": statistics.mean(t for t, _ in per_rank[0]["budgets"]),
        "memory_budget": statistics.mean(m for _, m in per_rank[0]["budgets"]),
    }


def _case(r: dict) -> tuple:
    return r["world_size"], r["routing"], r["s"], r["replay_layer"]


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's step time over ``ep``'s for the same world size, routing and seed: the median over measured
    steps of the ratio within a round (the two steps ran back to back, under the same background load)."""
    ep = {(*_case(r), r["seed"]): r["times_ms"] for r in rows if r["policy"] == "ep"}
    for r in rows:
        base = ep.get((*_case(r), r["seed"]))
        r["ratio_to_ep"] = round(statistics.median(t / b for t, b in zip(r["times_ms"], base)), 3) if base else None
    return rows


def run(config: Config, world: int) -> list[dict]:
    from hecate.launch.simulate import run_workers

    cases = scenarios(config)
    per_rank = run_workers(worker, world, config, cases, timeout_s=3600)
    results = iter(zip(*per_rank))
    return [
        summarize(config, world, scenario, policy, list(next(results)))
        for scenario in cases
        for policy in config.policies
    ]


MEAN_FIELDS = (
    "step_ms",
    "ratio_to_ep",
    "ratio_to_ep_uniform",
    "gather_bytes",
    "reduce_scatter_bytes",
    "token_bytes",
    "expert_bytes",
    "total_bytes",
    "rows_max_over_mean",
    "ideal_ratio",
    "peak_mib",
    "expert_mib_held",
    "gather_wait_ms",
    "reduce_scatter_wait_ms",
    "hottest_share",
    "overlap_budget",
    "memory_budget",
)


def means_over_seeds(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((*_case(r), r["policy"]), []).append(r)
    return [
        {
            **dict(zip(("world_size", "routing", "s", "replay_layer", "policy"), key)),
            **{f: statistics.mean(r[f] for r in group) for f in MEAN_FIELDS if group[0][f] is not None},
            "seeds": len(group),
        }
        for key, group in groups.items()
    ]


def _routing_label(r: dict) -> str:
    return f"zipf {r['s']}" if r["routing"] == "zipf" else f"replay L{r['replay_layer']}"


def print_table(means: list[dict]) -> None:
    print(
        f"{'ranks':>5}  {'routing':<10}{'policy':<11}{'step ms':>8}{'x ep':>7}{'x ep s=0':>9}"
        f"{'gather MiB':>11}{'RS MiB':>7}"
        f"{'token MiB':>10}{'rows max/mean':>14}{'ideal':>7}{'peak MiB':>9}{'held MiB':>9}{'t':>5}{'m':>5}"
    )
    for r in means:
        print(
            f"{r['world_size']:>5}  {_routing_label(r):<10}{r['policy']:<11}{r['step_ms']:>8.1f}"
            f"{r.get('ratio_to_ep', float('nan')):>7.3f}{r.get('ratio_to_ep_uniform', float('nan')):>9.3f}"
            f"{r['gather_bytes'] / 2**20:>11.1f}"
            f"{r['reduce_scatter_bytes'] / 2**20:>7.1f}{r['token_bytes'] / 2**20:>10.1f}"
            f"{r['rows_max_over_mean']:>14.3f}{r['ideal_ratio']:>7.3f}{r['peak_mib']:>9.1f}"
            f"{r['expert_mib_held']:>9.1f}{r['overlap_budget']:>5.1f}{r['memory_budget']:>5.1f}"
        )


def _verdict(value: float, limit: float) -> str:
    return f"{value:.3f} (goal <= {limit}: {'met' if value <= limit else 'NOT met'})"


def goals(means: list[dict]) -> list[str]:
    """The question's goals, on the means over seeds, one line each (where the rows they need were run). Step-time
    goals use the paired ratios (the ratio of the medians is in parentheses)."""
    by = {(r["world_size"], r["s"], r["policy"]): r for r in means if r["routing"] == "zipf"}
    lines = []
    for world in sorted({w for w, _, _ in by}):

        def figure(s: float, policy: str, name: str, world: int = world) -> float | None:
            row = by.get((world, s, policy))
            return None if row is None else row.get(name)

        ep0 = figure(0.0, "ep", "step_ms")
        for s in sorted({s for w, s, _ in by if w == world}):
            paired, median = figure(s, "fssdp", "ratio_to_ep_uniform"), figure(s, "fssdp", "step_ms")
            if paired is not None and median and ep0:
                limit = 1.05 if s == 0 else 1.1
                lines.append(
                    f"{world} ranks, s={s}: fssdp step / ep step at s=0: {_verdict(paired, limit)} ({median / ep0:.3f})"
                )
            fssdp, fsdp = figure(s, "fssdp", "expert_bytes"), figure(s, "fsdp", "expert_bytes")
            if fssdp is not None and fsdp:
                lines.append(
                    f"{world} ranks, s={s}: fssdp / fsdp gather + reduce-scatter bytes: "
                    f"{_verdict(fssdp / fsdp, 0.3)}; all bytes (with tokens) "
                    f"{figure(s, 'fssdp', 'total_bytes') / figure(s, 'fsdp', 'total_bytes'):.3f}"
                )
            for m in (1, 2):  # memory scarcer than overlap: load-proportional copies against shadowing
                proportional = figure(s, f"fssdp-t4m{m}", "ratio_to_ep")
                shadow = figure(s, "shadow-m1" if m == 1 else "shadow", "ratio_to_ep")
                if proportional is not None and shadow is not None:
                    lines.append(
                        f"{world} ranks, s={s}: t=4 > m={m}: fssdp {proportional:.3f}x ep, shadow {shadow:.3f}x ep "
                        f"(fssdp / shadow {proportional / shadow:.3f})"
                    )
            rm, ep = figure(s, "fssdp-rm", "peak_mib"), figure(s, "ep", "peak_mib")
            if rm and ep:
                lines.append(f"{world} ranks, s={s}: fssdp-rm peak memory / ep: {_verdict(rm / ep, 1.15)}")
    return lines


def cpu_jiffies() -> tuple[int, int]:
    """(all, steal) CPU time of the machine so far, from /proc/stat: steal is time the hypervisor gave away."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(defaults.world_sizes))
    parser.add_argument("--exponents", type=float, nargs="+", default=list(defaults.exponents))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--replay-layers", type=int, nargs="*", default=list(defaults.replay_layers))
    parser.add_argument("--replay-steps", type=int, default=defaults.replay_steps)
    parser.add_argument("--metrics", default=defaults.metrics, help="the run whose expert_load is replayed")
    parser.add_argument("--policies", nargs="+", default=list(defaults.policies), choices=list(POLICIES))
    for name in (
        "dim",
        "heads",
        "ffn_dim",
        "experts",
        "top_k",
        "tokens",
        "seq",
        "window",
        "overlap_budget",
        "memory_budget",
        "warmup",
        "iters",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--json", type=Path, help="write one JSON object per measured configuration to this file")
    args = parser.parse_args()
    config = Config(
        **{
            name: tuple(value) if isinstance(value, list) else value
            for name, value in vars(args).items()
            if name != "json"
        }
    )
    if config.warmup < config.window:
        raise SystemExit(f"--warmup ({config.warmup}) must be >= --window ({config.window})")
    if any(config.tokens % (config.seq * world) for world in config.world_sizes):
        raise SystemExit(f"--tokens ({config.tokens}) must be a multiple of --seq ({config.seq}) x each world size")
    start, (all_before, steal_before) = time.perf_counter(), cpu_jiffies()
    rows = with_ratios([row for world in config.world_sizes for row in run(config, world)])
    all_after, steal_after = cpu_jiffies()
    means = means_over_seeds(rows)
    print_table(means)
    print()
    print("\n".join(goals(means)))
    steal = (steal_after - steal_before) / max(all_after - all_before, 1)
    print(
        f"\n{len(rows)} configurations in {time.perf_counter() - start:.0f} s, CPU steal {100 * steal:.1f}%; "
        f"config: {json.dumps(asdict(config))}",
        file=sys.stderr,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
