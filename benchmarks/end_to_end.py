"""Question: how many tokens per second does the demo model train at on 1, 2 and 4 simulated ranks, and what
fraction of this machine's matmul peak (MFU) is that?

Each run is the real thing: ``hecate train examples/tiny.yaml --simulate N`` (N worker processes, gloo, each
with ``cores // N`` threads, at least one), with experts split over all ranks (``parallel.ep=N``; the dense layers
data-parallel over the same ranks), a short run (``--steps``), evaluation and checkpoint only at the end. One rank
is a plain ``hecate train`` with ``OMP_NUM_THREADS=1``: one thread per rank everywhere, so the three sizes compare
like for like (and because a two-thread process is ruinous on a shared machine: while other work keeps the cores
busy, its two OpenMP threads rarely run at once and every parallel region waits - measured here, 40-77 s per
step instead of about 1 s). The
figures come from the run's ``metrics.jsonl``: every step's ``step_time_s`` (data, forward, backward, gradient
averaging, clipping, optimizer) with the first ``--skip`` steps dropped as warm-up; tokens/s is the step's tokens
(global batch x sequence) over its time. World sizes take turns (1, 2, 4, 1, 2, 4, ... for ``--repeats``) so
that the machine's background load falls on all alike; the figures are over all measured steps of all repeats.

**FLOPs model**: the trainer's own (``hecate.trainer.flops``, whose docstring lists every term), with every routed
(token, expert) pair computed. Norms, activations, softmax and the optimizer are not counted (as in PaLM's MFU).
**Peak** = the measured single-thread matmul throughput of the precision used (a 1024^3 ``torch.mm``, fp32 or
bf16, one thread, median of rounds timed in CPU time as in ``floor.py``; measured before every run, the median
taken) x the cores the run can use
(min(cores, ranks x threads per rank): 1, 2 and 2 here, since 4 ranks of one thread share 2 cores).
MFU = FLOPs per token x tokens/s / peak.

    python benchmarks/end_to_end.py --json runs/end_to_end.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hecate.trainer.flops import step_flops

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, rounds: int = 10, warmup: int = 2) -> float:
    """Single-thread FLOP/s of an n x n x n ``torch.mm`` into a reused output (median of rounds, CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
        out = torch.empty(n, n, dtype=dtype)
        times = []
        for i in range(warmup + rounds):
            start = time.process_time()
            torch.mm(a, b, out=out)
            if i >= warmup:
                times.append(time.process_time() - start)
        return 2 * n**3 / statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of a run config (the vocabulary comes from its prepared data)."""
    vocab = json.loads((ROOT / cfg.data.dir / "manifest.json").read_text())["vocab_size"]
    moe_blocks = sum(cfg.moe.is_moe_block(i) for i in range(cfg.model.n_layers))
    return step_flops(cfg, vocab, tokens=1, expert_rows=cfg.moe.top_k * moe_blocks)  # every routed pair computed


def threads_per_rank(world: int, cores: int) -> int:
    """What ``hecate train --simulate N`` gives each rank; the single process runs with one thread."""
    return max(1, cores // world) if world > 1 else 1


def run_once(config: Path, world: int, steps: int, dtype: str, run_dir: Path) -> list[dict]:
    """One short training run; returns its per-step metrics lines."""
    hecate = Path(sys.executable).parent / "hecate"
    overrides = [
        f"train.steps={steps}",
        f"train.run_dir={run_dir}",
        f"train.dtype={dtype}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "checkpoint.every=0",
        "logging.progress=false",
    ]
    command = [str(hecate), "train", str(config), "--fresh"]
    env = dict(os.environ)
    if world > 1:
        overrides.append(f"parallel.ep={world}")
        command += ["--simulate", str(world)]
    else:
        env["OMP_NUM_THREADS"] = "1"
    for override in overrides:
        command += ["-o", override]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step_time_s" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps dropped from each run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench" / "end_to_end")
    parser.add_argument("--json", type=Path, help="write one JSON object per world size to this file")
    args = parser.parse_args()
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")

    from hecate.trainer.config import load_config

    cfg = load_config(args.config)
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cores = os.cpu_count() or 1
    peaks, steps = [], {world: [] for world in args.world_sizes}
    start = time.perf_counter()
    for _ in range(args.repeats):
        for world in args.world_sizes:
            peaks.append(matmul_peak_flops(dtype))
            lines = run_once(args.config, world, args.steps, args.dtype, args.run_dir / f"ranks{world}")
            steps[world] += [line["step_time_s"] for line in lines[args.skip :]]
    single_thread = statistics.median(peaks)
    flops = flops_per_token(cfg)  # after the runs: the first one prepares the data (vocabulary) when missing
    rows = []
    for world in args.world_sizes:
        threads = world * threads_per_rank(world, cores)
        peak = min(cores, threads) * single_thread
        tokens_per_s = [tokens_per_step / t for t in steps[world]]
        median = statistics.median(tokens_per_s)
        rows.append(
            {
                "world_size": world,
                "parallel": f"dp={world} ep={world}" if world > 1 else "single process",
                "dtype": args.dtype,
                "tokens_per_step": tokens_per_step,
                "step_ms": round(1e3 * statistics.median(steps[world]), 1),
                "tokens_per_s": round(median),
                "tokens_per_s_min_max": [round(min(tokens_per_s)), round(max(tokens_per_s))],
                "flops_per_token": flops,
                "achieved_gflops": round(flops * median / 1e9, 1),
                "peak_gflops": round(peak / 1e9, 1),
                "single_thread_gflops": round(single_thread / 1e9, 1),
                "cores_used": min(cores, threads),
                "mfu": round(flops * median / peak, 3),
                "measured_steps": len(steps[world]),
            }
        )
    print(
        f"model: {args.config.name}, {flops / 1e6:.1f} MFLOP per token (training), {tokens_per_step} tokens per step; "
        f"peak {args.dtype} matmul {single_thread / 1e9:.1f} GFLOP/s per core"
    )
    print(
        f"{'ranks':>5}  {'layout':<16}{'step ms':>8}{'tokens/s':>10}{'(min, max)':>16}"
        f"{'GFLOP/s':>9}{'peak':>7}{'MFU':>7}"
    )
    for r in rows:
        lo, hi = r["tokens_per_s_min_max"]
        print(
            f"{r['world_size']:>5}  {r['parallel']:<16}{r['step_ms']:>8.1f}{r['tokens_per_s']:>10}"
            f"{f'({lo}, {hi})':>16}{r['achieved_gflops']:>9.1f}{r['peak_gflops']:>7.1f}{r['mfu']:>7.3f}"
        )
    print(f"\n{len(rows)} world sizes x {args.repeats} repeats in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
