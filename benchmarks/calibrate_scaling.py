"""Question: with this machine's own compute and link figures, does the scale simulator predict the step times
we measure here? (issue 11; the check is ``tests/test_scaling.py::test_simulator_predicts_measured_cpu_steps``)

Measures, on 2 and 4 simulated ranks (worker processes with one thread each, as ``hecate train --simulate`` runs
them), all ranks at once, the figures probed after every measured round of steps so that they see the same
background load as the steps (this machine is shared; figures measured apart from the steps disagree with them):
- compute: the device's effective throughput, from a compute-only probe: the same block (same weights, router
  and routing) with all experts on the rank and no communication, forward + backward on the rank's own tokens
  (the balanced share of expert rows), all ranks at once; effective FLOP/s = the block's FLOPs as the simulator
  counts them (``Workload``) over the slowest rank's time, per case. Also fp32 matmul throughput on the expert
  matmul's shape (rows x D @ D x F), for reference (the check does not use it);
- link: gloo ``all_to_all_single`` time for a small and a large uniform split; latency = the small one's time,
  bandwidth = the extra bytes a rank sends over the extra time;
- step times: the MoE block of ``benchmarks/skew.py`` (attention + MoE, forward + backward, slowest rank) under
  ``ep`` and ``fssdp``, taking turns step by step, with each rank's routed pairs per expert recorded (the trace
  the simulator replays).
Writes ``tests/data/scaling_calibration.json``.

    python benchmarks/calibrate_scaling.py [--out tests/data/scaling_calibration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import skew  # noqa: E402  (the MoE block, its forced router and its per-policy runs)

from hecate.trainer.scaling.workload import BACKWARD_OVER_FORWARD, Workload  # noqa: E402

POLICIES = ("ep", "fssdp")
EXPONENTS = (0.0, 1.2)
SMALL_BYTES, LARGE_BYTES = 64 << 10, 4 << 20  # per peer


def matmul_flops_per_s(config: skew.Config, world: int, repeats: int = 20) -> float:
    rows = config.tokens * config.top_k // world
    a, b = torch.randn(rows, config.dim), torch.randn(config.dim, config.ffn_dim)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * rows * config.dim * config.ffn_dim / statistics.median(times)


def block_workload(config: skew.Config, world: int) -> Workload:
    """The benchmark's block as the simulator sees it: one MoE block, no embeddings, head or optimizer."""
    return Workload(
        dim=config.dim,
        seq_len=config.seq,
        n_layers=1,
        moe_layers=(0,),
        num_experts=config.experts,
        top_k=config.top_k,
        ffn_dim=config.ffn_dim,
        expert_matrices=2,
        dense_ffn_dim=0,
        shared_hidden=0,
        vocab_size=0,
        tokens_per_gpu=config.tokens // world,
        block_only=True,
    )


def block_flops(config: skew.Config, world: int) -> float:
    """Forward + backward FLOPs of one rank's block at the balanced share of expert rows."""
    workload = block_workload(config, world)
    forward = workload.attention_flops(workload.tokens_per_gpu) + workload.expert_flops(workload.pairs_per_gpu)
    return (1 + BACKWARD_OVER_FORWARD) * forward


class LocalBlock:
    """The measured block without communication: same weights, router and routing draws, every expert on this
    rank (``LocalDispatcher``, local router sums), this rank's own tokens."""

    def __init__(self, config: skew.Config, scenario: skew.Scenario):
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        self.block = skew.Block(config)
        moe = self.block.moe
        moe.router = skew.ForcedRouter(moe.router.gate, scenario.weights_E, config.top_k, scenario.seed, rank)
        self.x_BSD = torch.randn(
            config.tokens // (config.seq * world),
            config.seq,
            config.dim,
            generator=torch.Generator().manual_seed(1000 + rank),
        )

    def seconds(self) -> float:
        """The slowest rank's forward + backward, all ranks starting together."""
        import torch.distributed as dist

        dist.barrier()
        start = time.perf_counter()
        self.block(self.x_BSD).square().mean().backward()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        self.block.zero_grad(set_to_none=True)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()


def all_to_all_seconds(per_peer_bytes: int, repeats: int = 30) -> float:
    import torch.distributed as dist

    world = dist.get_world_size()
    send = torch.zeros(world * per_peer_bytes // 4)
    recv = torch.empty_like(send)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(recv, send)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def step_times(config: skew.Config, s: float) -> dict:
    """ep and fssdp taking turns; each rank's pairs per expert of every step (warm-up included)."""
    scenario = skew.Scenario("zipf", s, None, 0, tuple(skew.zipf_weights(config.experts, s, 0)))
    runs = {policy: skew.PolicyRun(config, scenario, policy) for policy in POLICIES}
    counts: list[list[int]] = []
    router = runs["ep"].block.moe.router  # the same draws under every policy (seeded by step and rank)
    router.register_forward_hook(
        lambda _m, _a, routing: counts.append(
            torch.bincount(routing.experts_TK.flatten(), minlength=config.experts).tolist()
        )
    )
    local = LocalBlock(config, scenario)
    times = {policy: [] for policy in POLICIES}
    probes = {"local_block_s": [], "flops_per_s": [], "small_s": [], "large_s": []}
    for step in range(config.warmup + config.iters):
        for policy, run in runs.items():
            seconds = run.step()
            if step >= config.warmup:
                times[policy].append(seconds)
        local_s = local.seconds()
        if step >= config.warmup:  # the machine's figures, under the same background load as the steps
            probes["local_block_s"].append(local_s)
            probes["flops_per_s"].append(matmul_flops_per_s(config, run.transport.world_size, repeats=3))
            probes["small_s"].append(all_to_all_seconds(SMALL_BYTES, repeats=3))
            probes["large_s"].append(all_to_all_seconds(LARGE_BYTES, repeats=3))
    return {"s": s, "times_s": times, "counts_SE": counts, "probes": probes}


def worker(config: skew.Config) -> dict:
    import torch.distributed as dist

    world = dist.get_world_size()
    cases = [step_times(config, s) for s in EXPONENTS]
    probes = {name: [v for case in cases for v in case["probes"][name]] for name in cases[0]["probes"]}
    flops = torch.tensor([statistics.median(probes["flops_per_s"])], dtype=torch.float64)
    dist.all_reduce(flops, op=dist.ReduceOp.MIN)
    small, large = statistics.median(probes["small_s"]), statistics.median(probes["large_s"])
    extra_bytes = (world - 1) * (LARGE_BYTES - SMALL_BYTES)
    for case in cases:  # each case's own figure too: its rounds' background load
        case["effective_flops_per_s"] = block_flops(config, world) / statistics.median(case["probes"]["local_block_s"])
    local_s = statistics.median(probes["local_block_s"])  # already the slowest rank's, the same on every rank
    return {
        "flops_per_s": flops.item(),
        "local_block_s": local_s,
        "effective_flops_per_s": block_flops(config, world) / local_s,
        "latency_s": small,
        "bytes_per_s": extra_bytes / max(large - small, 1e-9),
        "cases": cases,
    }


def measure(config: skew.Config, world: int) -> dict:
    from hecate.launch.simulate import run_workers

    per_rank = run_workers(worker, world, config, timeout_s=1800)
    first = per_rank[0]
    cases = []
    for i, case in enumerate(first["cases"]):
        counts_SRE = [
            [rank["cases"][i]["counts_SE"][step] for rank in per_rank] for step in range(len(case["counts_SE"]))
        ]
        for policy in POLICIES:
            cases.append(
                {
                    "policy": policy,
                    "s": case["s"],
                    "effective_flops_per_s": case["effective_flops_per_s"],
                    "local_block_ms": [round(1e3 * t, 2) for t in case["probes"]["local_block_s"]],
                    "step_ms_median": 1e3 * statistics.median(case["times_s"][policy]),
                    "step_ms": [round(1e3 * t, 2) for t in case["times_s"][policy]],
                    "counts_SRE": counts_SRE,
                }
            )
    return {
        "world_size": world,
        "flops_per_s": first["flops_per_s"],
        "local_block_s": first["local_block_s"],
        "effective_flops_per_s": first["effective_flops_per_s"],
        "latency_s": first["latency_s"],
        "bytes_per_s": first["bytes_per_s"],
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/scaling_calibration.json"))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    config = replace(skew.Config(), policies=POLICIES)
    started = time.perf_counter()
    results = [measure(config, world) for world in args.world_sizes]
    for r in results:
        print(
            f"{r['world_size']} ranks: {r['flops_per_s'] / 1e9:.1f} GFLOP/s matmul per rank, block without "
            f"communication {1e3 * r['local_block_s']:.1f} ms = {r['effective_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"effective, all-to-all latency "
            f"{1e3 * r['latency_s']:.2f} ms, {r['bytes_per_s'] / 2**30:.2f} GiB/s per rank"
        )
        for case in r["cases"]:
            print(f"  zipf {case['s']}: {case['policy']:<6} {case['step_ms_median']:.1f} ms")
    record = {
        "command": "python benchmarks/calibrate_scaling.py",
        "measured": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started),
        "cores": len(os.sched_getaffinity(0)),
        "block": asdict(config),
        "world_sizes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
