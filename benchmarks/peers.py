"""Question: on the same MoE layer, data and initial weights, how long does one training step take in Hecate and
in DeepSpeed-MoE, and how far is each from this machine's floor?

The layer: hidden 256, expert hidden 1024, 8 experts, top-2 softmax routing renormalized over the two chosen,
GELU (exact erf) two-matrix experts without biases, fp32, 4096 tokens per rank, one thread per rank, on 2 and 4
simulated ranks (gloo), under near-uniform and skewed routing (below). The step: forward, loss = mean of the
output's squares, backward to the input, the gate and the experts. Systems:

- ``hecate-ep``: expert parallelism as ``parallel.ep=P`` trains it (``ExpertParallelDispatcher``, local experts,
  router statistics reduced over the group), dropless;
- ``hecate-fssdp``: the FSSDP engine with the ``fssdp`` policy (replicas planned from a load window), dropless;
- ``deepspeed-dropless``: ``deepspeed.moe.layer.MoE(ep_size=P, k=2, drop_tokens=False)``; it pads every
  (rank, expert) slot to the largest count in the group;
- ``deepspeed-cf1``: the same with ``drop_tokens=True, capacity_factor=1.0`` (each expert keeps
  2 x T / E pairs per rank, first choices first).

**Skewed routing** (``--skew``, Zipf exponents s, default 0 and 1.2): the inputs are shifted so that the gate's
logits gain a fixed bias b_E, the same for every token and rank: every token gets v_D = the least-norm solution of
gate v = b (8 equations, 256 unknowns), so both systems, whose gates are the same matrix, see the same shifted
logits and route identically without any change to either. b is calibrated once (on 16,384 seeded tokens through
the seed-0 gate) so that the expected share of pairs per expert equals that of k distinct draws from Zipf(s)
popularity over a seeded permutation of the experts (``benchmarks/skew.py``'s definition). s = 0 adds no shift: the
freshly initialised router's own, near-uniform routing. For each system the JSON records the expert GEMM rows it
computes per rank (``rows_by_rank``) and their total over the real pairs (``rows_x_real``): DeepSpeed computes
E x C rows a rank, every (rank, expert) slot padded to the capacity C (dropless: the largest count in the group),
Hecate exactly the routed pairs.

DeepSpeed's second-expert sampling (Gumbel noise on the second choice) is turned off so that both systems route
every token identically (top-2 of the same logits). Every system starts from the same weights: Hecate's MoE is
built with seed 0 and copied into DeepSpeed's gate and experts (``nn.Linear`` weights are the transposes).
Before timing, each system runs one step and its output, input gradient, gate gradient and expert gradients are
compared with ``hecate-ep``'s (the relative difference, max |a - b| / max |b|, over all ranks; the routing's
pair counts must agree exactly); DeepSpeed with capacity reports the pairs it dropped instead.

All systems run in the same worker processes, taking turns step by step (the starting system rotates each
round), warm-up rounds discarded, so the machine's background load falls on all alike. A step's time is the
slowest rank's forward + backward; a system's figure is the median over measured rounds (min and max beside
it), and its ratio to DeepSpeed dropless is the median of the per-round ratios. Beside the wall time, each step's
CPU time summed over ranks (``time.process_time``) is kept: on a machine shared with other work it says how much
work a system did, which the machine's load does not inflate the way it inflates wall time; its multiple of the
floor is CPU seconds x single-thread FLOP/s / (P x FLOPs per rank). The floors come from
``benchmarks/floor.py``'s measurements, taken in the same workers before the steps. Peak memory is the largest,
over ranks, of live tensor bytes at the peak of one extra step (``MemTracker``: parameters, gradients,
activations, temporaries; not the allocator's own overhead). One more step of rank 0 runs under
``torch.profiler``; the JSON keeps its top operators by self time (where the time goes).

    python benchmarks/peers.py --json runs/peers.json
    python benchmarks/peers.py --world-sizes 2 --skew 1.2 --warmup 1 --iters 2   # a quick check

Shapes: T tokens per rank, D model dim, F expert hidden dim, E experts, P ranks, L = E / P local experts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402  (benchmarks/ is not a package)
import skew  # noqa: E402
from peer_systems import SYSTEMS, HecateFSSDP, System, build, hecate_moe  # noqa: E402

BASELINE = "deepspeed-dropless"
REFERENCE = "hecate-ep"  # the numerics every other system is compared with
EXTENSIONS_DIR = Path(__file__).resolve().parent.parent / "build" / "torch_extensions"  # DeepSpeed's JIT ops


@dataclass(frozen=True)
class Config:
    world_sizes: tuple[int, ...] = (2, 4)
    skews: tuple[float, ...] = (0.0, 1.2)  # Zipf exponents of the routing (0: the router's own, near-uniform)
    systems: tuple[str, ...] = SYSTEMS
    dim: int = 256
    ffn_dim: int = 1024
    experts: int = 8
    top_k: int = 2
    tokens: int = 4096  # per rank
    warmup: int = 5  # >= the FSSDP load window, so that its plan is settled when timing starts
    iters: int = 10

    @property
    def shape(self) -> floor.LayerShape:
        return floor.LayerShape(self.dim, self.ffn_dim, self.experts, self.top_k, self.tokens)


# ---- skewed routing -------------------------------------------------------------------------------------------


def routing_shift(config: Config, s: float, calibration_tokens: int = 16384, rounds: int = 200) -> torch.Tensor:
    """v_D such that gate(x + v) = gate(x) + b_E, b_E chosen so that the expected pairs per expert follow the
    top-k draws from Zipf(s) popularity (``skew.expected_share``). Zeros for s = 0."""
    if s == 0:
        return torch.zeros(config.dim)
    gate_ED = hecate_moe(config).router.gate.weight.detach()
    target_E = torch.tensor(skew.expected_share(skew.zipf_weights(config.experts, s, seed=0), config.top_k))
    x_TD = torch.randn(calibration_tokens, config.dim, generator=torch.Generator().manual_seed(999))
    logits_TE = x_TD @ gate_ED.t()
    bias_E = torch.zeros(config.experts)
    for _ in range(rounds):  # damped fixed point; top-k ignores a common offset, so keep the bias centred
        chosen = (logits_TE + bias_E).topk(config.top_k, dim=-1).indices.flatten()
        share_E = torch.bincount(chosen, minlength=config.experts).double() / chosen.numel()
        bias_E += 0.1 * torch.log(target_E / share_E.clamp_min(1e-6)).float()
        bias_E -= bias_E.mean()
    return torch.linalg.lstsq(gate_ED, bias_E.unsqueeze(1)).solution.squeeze(1)


def rank_input(config: Config, shift_D: torch.Tensor) -> torch.Tensor:
    """This rank's own seeded tokens, shifted; a leaf that collects the input gradient."""
    x_TD = torch.randn(config.tokens, config.dim, generator=torch.Generator().manual_seed(1000 + dist.get_rank()))
    return (x_TD + shift_D).requires_grad_(True)


# ---- one rank -----------------------------------------------------------------------------------------------


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the largest over ranks."""
    value = torch.tensor([((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def reference_step(system: System, x_TD: torch.Tensor) -> dict[str, torch.Tensor]:
    """One untimed step whose results are kept for the agreement check."""
    out = system.forward(x_TD)
    out.square().mean().backward()
    w1, w2 = system.expert_grads()
    results = {
        "out": out.detach().clone(),
        "x_grad": x_TD.grad.clone(),
        "gate_grad": system.gate_grad().clone(),
        "w1_grad": w1,
        "w2_grad": w2,
        "counts": system.counts(),
    }
    system.module.zero_grad(set_to_none=True)
    x_TD.grad = None
    system.after_step()
    results["rows_by_rank"] = _all_ranks(system.rows_computed())
    return results


def agreement(system: System, config: Config, mine: dict, reference: dict) -> dict:
    """How this system's first step compares with the reference's, on the same input and weights."""
    result = {"routing_identical": bool(torch.equal(mine["counts"].long(), reference["counts"].long()))}
    if getattr(system, "capacity_factor", None):
        result["dropped_pairs"] = system.dropped_pairs(config)
        result["pairs"] = config.tokens * config.top_k * dist.get_world_size()
        return result
    for key in ("out", "x_grad", "gate_grad", "w1_grad", "w2_grad"):
        result[key] = relative_difference(mine[key], reference[key])
    return result


def profile_step(system: System, x_TD: torch.Tensor, top: int = 12) -> list[dict]:
    """Rank 0's operators by self CPU time in one step (every rank runs the step; only rank 0 records)."""
    from torch.profiler import ProfilerActivity, profile

    if dist.get_rank() != 0:
        system.step(x_TD)
        return []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        system.step(x_TD)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in rows]


def peak_memory(system: System, x_TD: torch.Tensor) -> int:
    """Bytes of live tensors at the peak of one step."""
    tracker = MemTracker()
    tracker.track_external(system.module, x_TD)
    with tracker:
        system.step(x_TD)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def _all_ranks(value: int) -> list[int]:
    values = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value]))
    return [int(v) for v in values]


def worker(config: Config) -> dict:
    """This rank's measurements: the floors, then for each skew those of :func:`measure`."""
    if any(name.startswith("deepspeed") for name in config.systems):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the simulated group
    measured_floor = floor.measure_in_workers(config.shape)
    systems = [build(name, config) for name in config.systems]
    by_skew = {}
    for s in config.skews:
        shift_D = routing_shift(config, s) if dist.get_rank() == 0 else torch.empty(config.dim)
        dist.broadcast(shift_D, src=0)  # one calibration for all ranks
        by_skew[s] = measure(config, systems, rank_input(config, shift_D))
    return {"floor": measured_floor, "by_skew": by_skew}


def measure(config: Config, systems: list[System], x_TD: torch.Tensor) -> dict:
    """Agreement, rows computed, step times by system and round, peak memory and profiles on one input."""
    firsts = {s.name: reference_step(s, x_TD) for s in systems}
    agreements = {
        s.name: agreement(s, config, firsts[s.name], firsts[REFERENCE]) for s in systems if REFERENCE in firsts
    }
    rows = {s.name: firsts[s.name]["rows_by_rank"] for s in systems}
    counts = [int(c) for c in firsts[systems[0].name]["counts"]]
    for _ in range(config.warmup - 1):
        for system in systems:
            system.step(x_TD)
    times: dict[str, list[float]] = {s.name: [] for s in systems}
    cpu_times: dict[str, list[float]] = {s.name: [] for s in systems}
    for i in range(config.iters):
        start = i % len(systems)
        for system in systems[start:] + systems[:start]:
            wall, cpu = system.step(x_TD)
            times[system.name].append(wall)
            cpu_times[system.name].append(cpu)
    peaks = {s.name: peak_memory(s, x_TD) for s in systems}
    peak_ranks = {}
    for name, peak in peaks.items():
        value = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        peak_ranks[name] = int(value.item())
    extra = {s.name: {"replicas": s.engine.last_replicas} for s in systems if isinstance(s, HecateFSSDP)}
    profiles = {s.name: profile_step(s, x_TD) for s in systems}
    return {
        "agreement": agreements,
        "rows": rows,
        "counts_E": counts,
        "times": times,
        "cpu_times": cpu_times,
        "peak": peak_ranks,
        "profiles": profiles,
        "extra": extra,
    }


# ---- the parent: rows, tables -------------------------------------------------------------------------------


def paired_ratio(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios."""
    ratios = [t / b for t, b in zip(times, baseline)]
    return statistics.median(ratios), min(ratios), max(ratios)


def rows_for(config: Config, world: int, result: dict) -> list[dict]:
    """One JSON object per (skew, system) measured on ``world`` ranks."""
    return [row for s in config.skews for row in skew_rows(config, world, s, result["floor"], result["by_skew"][s])]


def skew_rows(config: Config, world: int, s: float, measured: dict, result: dict) -> list[dict]:
    """One JSON object per system measured on ``world`` ranks under Zipf(s) routing."""
    a2a = statistics.median(measured["all_to_all_s"])
    floors = floor.floors(config.shape, world, measured["single_thread_flops"], a2a)
    real_rows = world * config.tokens * config.top_k
    rows = []
    for name in config.systems:
        times = result["times"][name]
        median = statistics.median(times)
        row = {
            "world_size": world,
            "skew": s,
            "system": name,
            "step_ms": round(1e3 * median, 1),
            "step_ms_min": round(1e3 * min(times), 1),
            "step_ms_max": round(1e3 * max(times), 1),
            "times_ms": [round(1e3 * t, 1) for t in times],
        }
        if BASELINE in result["times"]:
            ratio = paired_ratio(times, result["times"][BASELINE])
            row.update(
                {
                    f"ratio_to_{BASELINE}": round(ratio[0], 3),
                    f"ratio_to_{BASELINE}_min_max": [round(ratio[1], 3), round(ratio[2], 3)],
                }
            )
        cpu = result["cpu_times"][name]
        row.update(
            {
                "cpu_ms_all_ranks": round(1e3 * statistics.median(cpu), 1),
                "cpu_x_floor_flops": round(
                    statistics.median(cpu) * measured["single_thread_flops"] / (world * config.shape.flops()), 3
                ),
            }
        )
        if BASELINE in result["cpu_times"]:
            row[f"cpu_ratio_to_{BASELINE}"] = round(paired_ratio(cpu, result["cpu_times"][BASELINE])[0], 3)
        row.update(
            {
                "x_compute_floor": round(median / floors["compute_floor_s"], 3),
                "x_compute_and_comm_floor": round(median / floors["floor_s"], 3),
                "compute_floor_ms": round(1e3 * floors["compute_floor_s"], 1),
                "comm_floor_ms": round(1e3 * floors["comm_floor_s"], 1),
                "single_thread_gflops": round(measured["single_thread_flops"] / 1e9, 1),
                "all_to_all_ms": round(1e3 * a2a, 2),
                "peak_mib": round(result["peak"][name] / 2**20, 1),
                "agreement": result["agreement"].get(name),
                "counts_E": result["counts_E"],
                "rows_by_rank": result["rows"][name],
                "rows_x_real": round(sum(result["rows"][name]) / real_rows, 3),
                "rows_max_x_mean_real": round(max(result["rows"][name]) * world / real_rows, 3),
                **result["extra"].get(name, {}),
                "profile_rank0": result["profiles"][name],
            }
        )
        rows.append(row)
    return rows


def run(config: Config, world: int) -> list[dict]:
    from hecate.launch.simulate import run_workers

    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))}
    result = run_workers(worker, world, config, timeout_s=1800, env=env)[0]
    return rows_for(config, world, result)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'ranks':>5}{'skew':>5}  {'system':<20}{'step ms':>8}{'min':>8}{'max':>8}{'x DS dropless':>14}"
        f"{'(min, max)':>16}{'x compute floor':>16}{'x floor':>8}{'CPU ms':>8}{'CPU x DS':>9}{'CPU x floor':>12}"
        f"{'peak MiB':>9}{'rows x real':>12}{'max/mean':>9}  agreement"
    )
    for r in rows:
        ratio = r.get(f"ratio_to_{BASELINE}", float("nan"))
        lo, hi = r.get(f"ratio_to_{BASELINE}_min_max", (float("nan"), float("nan")))
        agree = r["agreement"] or {}
        if "dropped_pairs" in agree:
            text = f"dropped {agree['dropped_pairs']} of {agree['pairs']} pairs"
        else:
            text = (
                (
                    "routing "
                    + ("identical" if agree.get("routing_identical") else "DIFFERS")
                    + ", max rel diff "
                    + f"{max(v for k, v in agree.items() if k != 'routing_identical'):.1e}"
                )
                if agree
                else "-"
            )
        print(
            f"{r['world_size']:>5}{r['skew']:>5}  {r['system']:<20}{r['step_ms']:>8.1f}{r['step_ms_min']:>8.1f}"
            f"{r['step_ms_max']:>8.1f}{ratio:>14.3f}{f'({lo:.3f}, {hi:.3f})':>16}{r['x_compute_floor']:>16.3f}"
            f"{r['x_compute_and_comm_floor']:>8.3f}{r['cpu_ms_all_ranks']:>8.0f}"
            f"{r.get(f'cpu_ratio_to_{BASELINE}', float('nan')):>9.3f}{r['cpu_x_floor_flops']:>12.3f}"
            f"{r['peak_mib']:>9.1f}{r['rows_x_real']:>12.3f}{r['rows_max_x_mean_real']:>9.3f}  {text}"
        )


def goals(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["system"] != "hecate-ep":
            continue
        ratio = r.get(f"ratio_to_{BASELINE}")
        if ratio is not None:
            lines.append(
                f"{r['world_size']} ranks, skew {r['skew']}: hecate-ep / deepspeed-dropless step time "
                f"{ratio:.3f} (goal <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})"
            )
        lines.append(
            f"{r['world_size']} ranks, skew {r['skew']}: hecate-ep / compute floor {r['x_compute_floor']:.3f} "
            f"(goal <= 1.25: {'met' if r['x_compute_floor'] <= 1.25 else 'NOT met'})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(defaults.world_sizes))
    parser.add_argument(
        "--skew",
        dest="skews",
        type=float,
        nargs="+",
        default=list(defaults.skews),
        help="Zipf exponents of the routing's expert popularity (0: the router's own routing)",
    )
    parser.add_argument("--systems", nargs="+", default=list(defaults.systems), choices=list(SYSTEMS))
    for name in ("dim", "ffn_dim", "experts", "top_k", "tokens", "warmup", "iters"):
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
    if config.warmup < 1 or config.iters < 1:
        raise SystemExit("--warmup and --iters must be >= 1")
    if any(s < 0 for s in config.skews):
        raise SystemExit(f"--skew values must be >= 0, got {list(config.skews)}")
    if any(config.experts % world for world in config.world_sizes):
        raise SystemExit(f"--experts ({config.experts}) must be a multiple of every world size")
    start = time.perf_counter()
    rows = [row for world in config.world_sizes for row in run(config, world)]
    print_table(rows)
    print()
    print("\n".join(goals(rows)))
    print(
        f"\n{len(rows)} configurations in {time.perf_counter() - start:.0f} s; config: {json.dumps(asdict(config))}",
        file=sys.stderr,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
