"""Question: what is the least time one MoE layer's training step can take on this machine, and what does
moving its tokens cost at the least?

**Compute floor.** The layer's FLOPs per rank and step (forward + backward, dropless, every routed row computed
once) divided by the matmul throughput measured here. Only the GEMMs are counted: per expert row, forward
x w1 and h w2, backward two GEMMs per forward GEMM (input gradient, weight gradient), each 2 D F FLOPs; plus the
router's x gate (three T x D x E GEMMs). Elementwise work (GELU, permutes, the weighted combine) is left out on
purpose: it is overhead the floor does not forgive. The throughput is measured on exactly the layer's six GEMM
shapes at balanced rows (under expert parallelism an expert's owner computes P T K / E rows), fp32, one thread,
outputs written into reused buffers (``torch.mm(out=)``), the median of repeated rounds timed in the process's
CPU time (``time.process_time``): what one core's BLAS reaches on this work while it runs it, which other work
on a shared machine does not dilute (on an idle machine CPU time and wall time agree). Rank 0 measures it while
the other ranks wait.
With P ranks of one thread on C cores the ranks share min(P, C) cores, so

    compute floor (s) = P x FLOPs per rank / (min(P, C) x single-thread FLOP/s).

**Communication floor.** Four token all-to-alls per step (dispatch and combine, forward and backward), each
moving every routed row once: ``all_to_all_single`` of T K rows x D fp32 per rank, evenly split, on the same
gloo group, the median over repeats of the slowest rank. The floor is four times that.

    python benchmarks/floor.py --json runs/floor.json

Shapes: T tokens per rank, D model dim, F expert hidden dim, E experts, K experts per token, P ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LayerShape:
    dim: int = 256
    ffn_dim: int = 1024
    experts: int = 8
    top_k: int = 2
    tokens: int = 4096  # per rank

    @property
    def rows(self) -> int:
        """Routed rows per rank (token, expert pairs)."""
        return self.tokens * self.top_k

    def flops(self) -> int:
        """GEMM FLOPs per rank for forward + backward: 3 x (forward) with two expert GEMMs and one router GEMM."""
        experts = 2 * (2 * self.rows * self.dim * self.ffn_dim)
        router = 2 * self.tokens * self.dim * self.experts
        return 3 * (experts + router)

    def token_bytes(self) -> int:
        """Bytes of one all-to-all's input per rank: every routed row, fp32."""
        return self.rows * self.dim * 4


def expert_gemms(rows: int, dim: int, ffn: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(a, b, out) of the six GEMMs of one expert's forward and backward, with the operands transposed as
    autograd passes them: forward x_ND w1_DF, h_NF w2_FD; backward dh = dy w2^T, dw2 = h^T dy, dx = dh w1^T,
    dw1 = x^T dh."""
    generator = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)
    h, dh = torch.randn(rows, ffn, generator=generator), torch.randn(rows, ffn, generator=generator)
    w1, w2 = torch.randn(dim, ffn, generator=generator), torch.randn(ffn, dim, generator=generator)
    pairs = [(x, w1), (h, w2), (dy, w2.t()), (h.t(), dy), (dh, w1.t()), (x.t(), dh)]
    return [(a, b, torch.empty(a.shape[0], b.shape[1])) for a, b in pairs]


def matmul_flops_per_s(shape: LayerShape, rows: int, rounds: int = 15, warmup: int = 3) -> float:
    """FLOP/s of the layer's six GEMM shapes with ``rows`` rows per expert on this process's threads (median over
    rounds of all six)."""
    gemms = expert_gemms(rows, shape.dim, shape.ffn_dim)
    flops = 6 * 2 * rows * shape.dim * shape.ffn_dim
    times = []
    for i in range(warmup + rounds):
        start = time.process_time()
        for a, b, out in gemms:
            torch.mm(a, b, out=out)
        if i >= warmup:
            times.append(time.process_time() - start)
    return flops / statistics.median(times)


def all_to_all_seconds(nbytes: int, iters: int = 10, warmup: int = 3) -> list[float]:
    """Inside a worker of the world group: seconds of the slowest rank for one evenly split
    ``all_to_all_single`` of ``nbytes`` per rank, per measured iteration."""
    world = dist.get_world_size()
    send = torch.randn(nbytes // 4 // world * world)
    recv = torch.empty_like(send)
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(recv, send)
        slowest = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(slowest.item())
    return times


def measure_in_workers(shape: LayerShape) -> dict:
    """Inside every rank of a simulated group (one thread each): rank 0 measures the single-thread matmul rate
    while the others wait (alone on the machine), then every rank at once (each rank's rate under P-way
    sharing), then the all-to-all. Every rank returns the same dict."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = shape.rows * world // shape.experts  # an expert's rows on its owner, balanced
    alone = torch.zeros(1, dtype=torch.float64)
    if rank == 0:
        alone[0] = matmul_flops_per_s(shape, rows)
    dist.barrier()
    dist.broadcast(alone, 0)
    together = torch.tensor([matmul_flops_per_s(shape, rows)], dtype=torch.float64)
    rates = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(rates, together)
    a2a = all_to_all_seconds(shape.token_bytes()) if world > 1 else [0.0]
    return {
        "single_thread_flops": alone.item(),
        "concurrent_flops_per_rank": [r.item() for r in rates],
        "all_to_all_s": a2a,
    }


def floors(
    shape: LayerShape, world: int, single_thread_flops: float, all_to_all_s: float, cores: int | None = None
) -> dict:
    """The two floors of one step on ``world`` ranks, in seconds (see the module docstring)."""
    cores = cores or os.cpu_count() or 1
    compute = world * shape.flops() / (min(world, cores) * single_thread_flops)
    comm = 4 * all_to_all_s if world > 1 else 0.0
    return {"compute_floor_s": compute, "comm_floor_s": comm, "floor_s": compute + comm}


def measure(shape: LayerShape, world: int) -> dict:
    """One JSON row: the floors of ``world`` simulated ranks, with what they were computed from."""
    from hecate.launch.simulate import run_workers

    measured = run_workers(measure_in_workers, world, shape, timeout_s=600)[0]
    a2a = statistics.median(measured["all_to_all_s"])
    return {
        "world_size": world,
        "cores": os.cpu_count(),
        **asdict(shape),
        "layer_gflops_per_rank": shape.flops() / 1e9,
        "single_thread_gflops": measured["single_thread_flops"] / 1e9,
        "concurrent_gflops_per_rank": [round(r / 1e9, 1) for r in measured["concurrent_flops_per_rank"]],
        "all_to_all_mib": shape.token_bytes() / 2**20,
        "all_to_all_ms": 1e3 * a2a,
        "all_to_all_ms_min_max": [1e3 * min(measured["all_to_all_s"]), 1e3 * max(measured["all_to_all_s"])],
        **{k: v for k, v in floors(shape, world, measured["single_thread_flops"], a2a).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LayerShape()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    for name in ("dim", "ffn_dim", "experts", "top_k", "tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--json", type=Path, help="write one JSON object per world size to this file")
    args = parser.parse_args()
    shape = LayerShape(args.dim, args.ffn_dim, args.experts, args.top_k, args.tokens)
    rows = [measure(shape, world) for world in args.world_sizes]
    print(f"layer: {json.dumps(asdict(shape))}; {shape.flops() / 1e9:.2f} GFLOP per rank and step")
    print(
        f"{'ranks':>5}{'1-thread GFLOP/s':>18}{'concurrent':>16}{'a2a MiB':>9}{'a2a ms':>8}"
        f"{'compute floor ms':>18}{'comm floor ms':>15}{'floor ms':>10}"
    )
    for r in rows:
        concurrent = statistics.median(r["concurrent_gflops_per_rank"])
        print(
            f"{r['world_size']:>5}{r['single_thread_gflops']:>18.1f}{concurrent:>16.1f}{r['all_to_all_mib']:>9.1f}"
            f"{r['all_to_all_ms']:>8.1f}{1e3 * r['compute_floor_s']:>18.1f}{1e3 * r['comm_floor_s']:>15.1f}"
            f"{1e3 * r['floor_s']:>10.1f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
