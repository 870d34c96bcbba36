"""How much of the MoE layer's communication hides behind its computation when dispatch/compute/combine are
pipelined in chunks (``moe.overlap_chunks``) and the block's batch is split in sub-batches whose attention runs
while another sub-batch's tokens travel (``moe.overlap_sub_batches``)?

One transformer block (attention + MoE, experts split over all ranks by expert parallelism), forward + backward,
on 2 and 4 simulated ranks, with overlap off (1 chunk, 1 sub-batch), chunks only (``--chunks``) and on
(``--chunks`` and ``--sub-batches``), measured alternately (off, chunks, on, off, ...) in one run. Per
configuration:

    t_off, t_on   median step time (slowest rank of each iteration); t_chunks likewise, chunks only
    on/off        median over iterations of t_on,i / t_off,i, and a 90% confidence interval for that median
                  (distribution-free, from order statistics): on this machine it moves a few % from run to run
    t_comm        the MoE exchanges' own time with overlap off (they are synchronous then): per exchange, the
                  shortest time any rank was blocked in it (the rank that issues it last waits for the transfer
                  only, not for other ranks), summed over the step's exchanges, median
    t_blocked     time blocked in the MoE exchanges with overlap off, median; per iteration the most any rank was
                  blocked: t_comm plus the waits for slower ranks. On 4 ranks over 2 cores most of the waiting is
                  the rank that shares the core computing (the cores stand idle 1-2% of a loopback step): time the
                  core is busy, which no overlap can give back, so it is not counted as communication
    t_compute     t_off - t_blocked
    t_experts     the experts' own forward + backward on the rows a rank receives in a step (timed alone): the
                  only compute that chunks alone can run while the exchanges travel - attention, router and
                  permutations happen before the first dispatch or after the last combine; sub-batches add
                  the attention of one sub-batch under the exchanges of another
    saved         median over iterations of t_off,i - t_on,i (the two run back to back in each iteration, so the
                  pairing cancels most of this machine's slow drifts; the step-to-step spread is tens of ms)
    hidden        saved / min(t_comm, t_compute): the share of the hideable time that was hidden (the issue's
                  figure), and the 90% interval of saved's median over the same hideable time; chunks hidden the
                  same for chunks only; hidden with waits = saved / min(t_blocked, t_compute), the waits counted as
                  communication too (a figure capped well below 100% when ranks share cores)
    cores idle    the share of this machine's core time left idle during a step (/proc/stat), off / on: how
                  much of the machine the communication leaves unused (on 4 ranks over 2 cores a rank's wait is
                  mostly another rank's compute)
    link adds     behind the simulated link: median over iterations of (step behind the link - the loopback step
                  measured beside it), overlap off and on; link time hidden = 1 - on / off: the simulated link's
                  own time, without the loopback copies (CPU work on the cores the ranks compute on) that t_comm
                  also holds

on raw loopback (gloo on this machine's cores) and behind the simulated network (``--sim-nodes``: every rank its
own node), every network's three variants back to back in each iteration, with the link's bandwidth set so that
one step's transfers take about as long as the experts' compute (``--link-ratios``, default 1, x t_experts).
Each rank is bound to cores of its own (with more ranks than cores, ranks r and r + cores share one), as mpirun
binds ranks; ``--no-bind-cores`` leaves them free.

FSSDP prefetch (``--fssdp``): the same block under the FSSDP engine with the ``fsdp`` policy (every expert
gathered every step, the most there is to hide) behind a link on which the SparseAllGather takes
``--prefetch-link-ratio`` x the attention's forward. The gather is issued before the attention and waited before
the experts; the SparseReduceScatter is issued when backward leaves the experts and waited at the end of
backward. The same steps run on loopback and behind the link, alternating; under ``fsdp`` every expert is local,
so the tokens stay home and only the gather and the reduce-scatter cross the link: exposed = step time behind the
link - on loopback, transfer = both collectives' modeled time (bytes / link), hidden = 1 - exposed / transfer.

Prints tables; ``--json PATH`` writes one object per configuration.

    .venv/bin/python benchmarks/overlap.py --json runs/overlap.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hecate.collectives import TorchTransport, delta
from hecate.collectives.simulated_network import SimulatedNetwork, SimulatedNetworkTransport
from hecate.launch.simulate import run_workers
from hecate.parallel.config import FssdpConfig, MoEConfig
from hecate.parallel.expert_sharding import ExpertParallel, FullySharded
from hecate.trainer.config import ModelConfig
from hecate.trainer.model import Block, rope_tables

# 4,096 tokens a rank (2,048 for the wide comm-heavy block): a chunk's expert GEMMs keep enough rows to run at the
# full-size GEMMs' rate on a CPU core, and the per-chunk fixed costs stay small next to them
SHAPES = {  # name: (dim, heads, expert ffn_dim, experts, batch, seq)
    "comm-heavy": (1024, 8, 128, 8, 16, 128),
    "demo": (256, 4, 256, 8, 32, 128),
    "compute-heavy": (256, 4, 2048, 8, 32, 128),
}
MOE_OPS = ("moe.dispatch", "moe.combine", "moe.dispatch.backward", "moe.combine.backward", "moe.counts")


def build(shape: str, transport, chunks: int, sub_batches: int = 1) -> tuple[Block, torch.Tensor, tuple]:
    """The block with this rank's experts and a chunked expert-parallel dispatcher, its input and RoPE tables."""
    block, x, rope = build_whole(shape, transport.rank)
    block.ffn.cfg.overlap_sub_batches = sub_batches
    ExpertParallel(transport, None, 1, overlap_chunks=chunks).wrap(block)
    return block, x, rope


def build_whole(shape: str, rank: int) -> tuple[Block, torch.Tensor, tuple]:
    """The block with all its experts (seed 0), this rank's input and the RoPE tables."""
    dim, heads, ffn, experts, batch, seq = SHAPES[shape]
    cfg = ModelConfig(dim=dim, n_heads=heads, n_layers=1, seq_len=seq)
    torch.manual_seed(0)
    block = Block(cfg, MoEConfig(num_experts=experts, ffn_dim=ffn, top_k=2))
    torch.manual_seed(1 + rank)
    x = torch.randn(batch, seq, dim)
    return block, x, rope_tables(seq, dim // heads, cfg.rope_theta)


def step(block: Block, x: torch.Tensor, rope: tuple) -> None:
    block(x, *rope).square().mean().backward()


def time_experts(block: Block, x: torch.Tensor, iters: int) -> float:
    """Median forward + backward of this rank's experts alone on the rows it receives in a step under even
    routing (its T tokens x K, split evenly over its experts), slowest rank."""
    experts = block.ffn.experts
    local = experts.w1.shape[0]
    rows_per_expert = x.shape[0] * x.shape[1] * block.ffn.cfg.top_k // local
    rows_MD = torch.randn(rows_per_expert * local, x.shape[-1], requires_grad=True)
    counts_H = torch.full((local,), rows_per_expert)
    times = []
    for _ in range(iters + 1):
        start = time.perf_counter()
        experts(rows_MD, counts_H).square().mean().backward()
        times.append(time.perf_counter() - start)
    return slowest(statistics.median(times[1:]))


def time_attention(block: Block, x: torch.Tensor, rope: tuple, iters: int) -> float:
    """Median forward of the block's attention (with its norm), slowest rank: what the prefetched gather can hide
    under."""
    times = []
    with torch.no_grad():
        for _ in range(iters + 1):
            start = time.perf_counter()
            block.attn(block.attn_norm(x), *rope)
            times.append(time.perf_counter() - start)
    return slowest(statistics.median(times[1:]))


def measure_fssdp(shape: str, iters: int, warmup: int, link_ratio: float, latency_us: float) -> dict:
    """FSSDP with the fsdp policy on loopback and behind a link on which the gather takes link_ratio x the
    attention forward, alternating: the step time the link adds is the exposed part of the transfers."""
    world, rank = dist.get_world_size(), dist.get_rank()
    block, x, rope = build_whole(shape, rank)
    t_attention = time_attention(block, x, rope, iters)
    experts = block.ffn.experts
    expert_bytes = sum(w.numel() for w in (experts.w1, experts.w2, experts.w3) if w is not None) * 4 // len(experts.w1)
    gathered_bytes = (len(experts.w1) - len(experts.w1) // world) * expert_bytes  # every expert it does not own
    network = SimulatedNetwork(world, gathered_bytes * 8 / (link_ratio * t_attention) / 1e9, latency_us)
    tokens_group = dist.new_group(list(range(world)))  # as training does: tokens on a group of their own
    setups = {
        "loopback": (TorchTransport(), TorchTransport(tokens_group)),
        "simulated": tuple(
            SimulatedNetworkTransport(t, network, list(range(world)))
            for t in (TorchTransport(), TorchTransport(tokens_group))
        ),
    }
    runs = {}
    for name, (sparse, tokens) in setups.items():
        block, _, _ = build_whole(shape, rank)
        sharding = FullySharded(sparse, FssdpConfig(policy="fsdp"), token_transport=tokens)
        sharding.wrap(block)
        runs[name] = (block, sharding.engine)
    times = {name: [] for name in runs}
    for i in range(warmup + iters):
        for name, (block, engine) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            step(block, x, rope)
            elapsed = slowest(time.perf_counter() - start)
            engine.end_step(None)
            if i >= warmup:
                times[name].append(elapsed)
    # the gather and the reduce-scatter each move every non-owned expert once over the link
    transfer_s = 2 * (network.transfer_s(gathered_bytes) + latency_us * 1e-6)
    t_loop, t_sim = statistics.median(times["loopback"]), statistics.median(times["simulated"])
    return {
        "shape": shape,
        "ranks": world,
        "network": "simulated",
        "policy": "fsdp",
        "inter_node_gbps": network.inter_node_gbps,
        "latency_us": latency_us,
        "t_attention_fwd_ms": 1e3 * t_attention,
        "t_loopback_ms": 1e3 * t_loop,
        "t_simulated_ms": 1e3 * t_sim,
        "transfer_ms": 1e3 * transfer_s,
        "exposed_ms": 1e3 * (t_sim - t_loop),
        "hidden": 1 - (t_sim - t_loop) / transfer_s,
    }


def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t.item()


def moe_exchanges(transport, before: dict) -> tuple[torch.Tensor, int]:
    """Seconds blocked in each MoE exchange (``MOE_OPS`` order) and bytes sent by them all since the stats
    snapshot ``before``."""
    moved = delta(transport.stats.snapshot(), before)
    ops = [moved[n] for n in MOE_OPS if n in moved]
    return torch.tensor([op.wait_s for op in ops], dtype=torch.float64), sum(op.bytes_sent for op in ops)


def blocked_and_own(waits: torch.Tensor) -> tuple[float, float]:
    """The longest total blocked time of any rank, and the exchanges' own time: per exchange the shortest wait of
    any rank (the last to issue it waits for the transfer only), summed. With overlap off every op name is one
    exchange a step."""
    shortest = waits.clone()
    dist.all_reduce(shortest, dist.ReduceOp.MIN)
    return slowest(waits.sum().item()), shortest.sum().item()


def measure(shape: str, transports: dict, chunks: int, sub_batches: int, iters: int, warmup: int) -> dict:
    """Per network: alternate off / chunks / on, and the networks too, so every iteration holds all six steps
    back to back (each iteration starting one step later in the cycle, so that no step always runs first);
    returns each network's per-iteration step times, idle core shares and, with overlap off, its blocked time and
    its exchanges' own time."""
    variants = {"off": (1, 1), "chunks": (chunks, 1), "on": (chunks, sub_batches)}
    blocks = {
        (net, name): build(shape, transport, *variant)
        for net, transport in transports.items()
        for name, variant in variants.items()
    }
    times = {key: [] for key in blocks}
    idle = {key: [] for key in blocks}
    comm = {net: [] for net in transports}
    order = list(blocks)
    for i in range(warmup + iters):
        for net, name in order[i % len(order) :] + order[: i % len(order)]:  # each step first in turn
            block, x, rope = blocks[net, name]
            before = transports[net].stats.snapshot()
            dist.barrier()
            start, idle_before = time.perf_counter(), idle_core_s()
            step(block, x, rope)
            local_s = time.perf_counter() - start
            idle_share = (idle_core_s() - idle_before) / (os.cpu_count() * local_s)
            elapsed = slowest(local_s)
            waits = moe_exchanges(transports[net], before)[0]
            if i >= warmup:
                times[net, name].append(elapsed)
                idle[net, name].append(idle_share)
                if name == "off":
                    comm[net].append(blocked_and_own(waits))
    return {
        net: {
            "times": {name: times[net, name] for name in variants},
            "idle": {name: statistics.median(idle[net, name]) for name in variants},
            "t_blocked": statistics.median(b for b, _ in comm[net]),
            "t_comm": statistics.median(c for _, c in comm[net]),
        }
        for net in transports
    }


def idle_core_s() -> float:
    """Idle CPU seconds summed over this machine's cores since boot (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def per_iteration(a: list[float], b: list[float], op) -> list[float]:
    """op(a_i, b_i) for each iteration: the two were measured back to back in it."""
    return [op(x, y) for x, y in zip(a, b)]


def paired(a: list[float], b: list[float], op) -> float:
    """Median over iterations of op(a_i, b_i)."""
    return statistics.median(per_iteration(a, b, op))


def median_ci(values: list[float], level: float = 0.9) -> tuple[float, float]:
    """A confidence interval for the median that assumes no distribution: [x_(k), x_(n+1-k)] of the sorted
    values, with k the largest rank for which P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so it covers the median
    with probability >= level (k at least 1: with few values, their range)."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def share(part: float, whole: float) -> float | None:
    """part / whole, or None when there is nothing to share (whole <= 0)."""
    return part / whole if whole > 0 else None


def fssdp_worker(shapes: list[str], iters: int, warmup: int, link_ratio: float, latency_us: float) -> list | None:
    rows = [measure_fssdp(shape, iters, warmup, link_ratio, latency_us) for shape in shapes]
    return rows if dist.get_rank() == 0 else None


def worker(
    shapes: list[str],
    chunks: int,
    sub_batches: int,
    iters: int,
    warmup: int,
    link_ratios: list[float],
    latency_us: float,
) -> list:
    world, rank = dist.get_world_size(), dist.get_rank()
    loopback = TorchTransport()
    rows = []
    for shape in shapes:
        block, x, rope = build(shape, loopback, 1)
        t_experts = time_experts(block, x, iters)
        before = loopback.stats.snapshot()
        step(block, x, rope)
        nbytes = slowest(moe_exchanges(loopback, before)[1])
        transports, links = {"loopback": loopback}, {"loopback": (None, None)}
        for ratio in link_ratios:  # the link: one step's bytes take ratio x the experts' compute
            network = SimulatedNetwork(world, nbytes * 8 / (ratio * t_experts) / 1e9, latency_us)
            transports[f"link {ratio:g}"] = SimulatedNetworkTransport(TorchTransport(), network, list(range(world)))
            links[f"link {ratio:g}"] = (ratio, network.inter_node_gbps)
        measured = measure(shape, transports, chunks, sub_batches, iters, warmup)
        loop = measured["loopback"]["times"]
        for net, m in measured.items():
            (ratio, gbps), t = links[net], m["times"]
            t_off, t_comm, t_blocked = statistics.median(t["off"]), m["t_comm"], m["t_blocked"]
            t_compute = max(t_off - t_blocked, 0.0)
            hideable = min(t_comm, t_compute)
            saved_each = per_iteration(t["off"], t["on"], lambda off, on: off - on)
            saved = statistics.median(saved_each)
            saved_chunks = paired(t["off"], t["chunks"], lambda off, on: off - on)
            on_over_off = per_iteration(t["off"], t["on"], lambda off, on: on / off)
            row = {
                "shape": shape,
                "ranks": world,
                "network": "loopback" if ratio is None else "simulated",
                "link_ratio": ratio,
                "chunks": chunks,
                "sub_batches": sub_batches,
                "inter_node_gbps": gbps,
                "latency_us": latency_us if gbps else None,
                "t_off_ms": 1e3 * t_off,
                "t_chunks_ms": 1e3 * statistics.median(t["chunks"]),
                "t_on_ms": 1e3 * statistics.median(t["on"]),
                "t_comm_ms": 1e3 * t_comm,
                "t_blocked_ms": 1e3 * t_blocked,
                "t_compute_ms": 1e3 * t_compute,
                "t_experts_ms": 1e3 * t_experts,
                "on_over_off": statistics.median(on_over_off),
                "on_over_off_ci90": median_ci(on_over_off),
                "saved_ms": 1e3 * saved,
                "hidden": share(saved, hideable),
                "hidden_ci90": [share(v, hideable) for v in median_ci(saved_each)],
                "chunks_hidden": share(saved_chunks, hideable),
                "hidden_with_waits": share(saved, min(t_blocked, t_compute)),
                "bytes_per_step": nbytes,
                "idle_off": m["idle"]["off"],
                "idle_on": m["idle"]["on"],
                "times_ms": {name: [round(1e3 * v, 2) for v in values] for name, values in t.items()},
            }
            if ratio is not None:  # what the link adds to each step, paired with the loopback step beside it
                added_off = paired(t["off"], loop["off"], lambda sim, raw: sim - raw)
                added_on = paired(t["on"], loop["on"], lambda sim, raw: sim - raw)
                row.update(
                    link_added_off_ms=1e3 * added_off,
                    link_added_on_ms=1e3 * added_on,
                    link_hidden=share(added_off - added_on, added_off),
                )
            rows.append(row)
    return rows if rank == 0 else None


def percent(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--chunks", type=int, default=2, help="overlap chunks with overlap on (default 2)")
    parser.add_argument("--sub-batches", type=int, default=2, help="sub-batches with overlap on (default 2)")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--link-ratios",
        type=float,
        nargs="+",
        default=[1.0],
        help="simulated links: transfer time of one step / the experts' compute time (default 1)",
    )
    parser.add_argument(
        "--prefetch-link-ratio",
        type=float,
        default=1.0,
        help="--fssdp's link: the gather's transfer time / the attention forward (default 1)",
    )
    parser.add_argument("--latency-us", type=float, default=20.0)
    parser.add_argument("--fssdp", action="store_true", help="also measure the FSSDP gather / reduce-scatter hiding")
    parser.add_argument(
        "--no-bind-cores",
        dest="bind_cores",
        action="store_false",
        help="leave the ranks free to run on any core (default: each rank bound to cores of its own)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        print(
            "overlap.py: --device cuda needs NCCL ranks on separate GPUs; this benchmark runs the CPU/gloo "
            f"simulated cluster only (torch.cuda.is_available() = {torch.cuda.is_available()})",
            file=sys.stderr,
        )
        return 2
    rows, prefetch = [], []
    for ranks in args.ranks:
        rows += run_workers(
            worker,
            ranks,
            args.shapes,
            args.chunks,
            args.sub_batches,
            args.iters,
            args.warmup,
            args.link_ratios,
            args.latency_us,
            timeout_s=3600,
            bind_cores=args.bind_cores,
        )[0]
        if args.fssdp:
            prefetch += run_workers(
                fssdp_worker,
                ranks,
                args.shapes,
                args.iters,
                args.warmup,
                args.prefetch_link_ratio,
                args.latency_us,
                timeout_s=3600,
                bind_cores=args.bind_cores,
            )[0]
    print(
        "| shape | ranks | network | link ratio | Gbit/s | t_off ms | t_chunks ms | t_on ms | on/off (90% CI) "
        "| saved ms | t_comm ms | t_blocked ms | t_compute ms | t_experts ms | chunks hidden | hidden (90% CI) "
        "| hidden with waits | cores idle off / on |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbps = f"{r['inter_node_gbps']:.2f}" if r["inter_node_gbps"] else "-"
        ratio = f"{r['link_ratio']:g}" if r["link_ratio"] else "-"
        ci, hidden_ci = r["on_over_off_ci90"], r["hidden_ci90"]
        print(
            f"| {r['shape']} | {r['ranks']} | {r['network']} | {ratio} | {gbps} | {r['t_off_ms']:.1f} | "
            f"{r['t_chunks_ms']:.1f} | {r['t_on_ms']:.1f} | {r['on_over_off']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | "
            f"{r['saved_ms']:.1f} | {r['t_comm_ms']:.1f} | {r['t_blocked_ms']:.1f} | {r['t_compute_ms']:.1f} | "
            f"{r['t_experts_ms']:.1f} | {percent(r['chunks_hidden'])} | "
            f"{percent(r['hidden'])} ({percent(hidden_ci[0])} to {percent(hidden_ci[1])}) | "
            f"{percent(r['hidden_with_waits'])} | {percent(r['idle_off'])} / {percent(r['idle_on'])} |"
        )
    print("\n| shape | ranks | link ratio | link adds, off ms | link adds, on ms | link time hidden |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["link_ratio"]:
            print(
                f"| {r['shape']} | {r['ranks']} | {r['link_ratio']:g} | {r['link_added_off_ms']:.1f} | "
                f"{r['link_added_on_ms']:.1f} | {percent(r['link_hidden'])} |"
            )
    if prefetch:
        print(
            "\n| shape | ranks | Gbit/s | attention fwd ms | step ms loopback | step ms simulated | transfer ms "
            "| exposed ms | hidden |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in prefetch:
            print(
                f"| {r['shape']} | {r['ranks']} | {r['inter_node_gbps']:.2f} | {r['t_attention_fwd_ms']:.1f} | "
                f"{r['t_loopback_ms']:.1f} | {r['t_simulated_ms']:.1f} | {r['transfer_ms']:.1f} | "
                f"{r['exposed_ms']:.1f} | {percent(r['hidden'])} |"
            )
    if args.json:
        for r in rows + prefetch:
            r["bind_cores"] = args.bind_cores
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows + prefetch, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
