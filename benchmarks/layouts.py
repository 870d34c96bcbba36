"""Question: how fast does the demo model (examples/tiny.yaml) train on 4 simulated ranks under each tensor /
pipeline / expert-tensor layout (issue 7), next to plain DP x EP, and how large is the pipeline bubble measured
against the schedule's theory?

All layouts live in one group of 4 worker processes (gloo, one thread each; this machine has 2 cores, shared) and
take turns step by step (A B C ... A B C ...), so that background load falls on all alike. Every layout trains the
same 16 sequences x 128 tokens per step as 4 micro-batches of 4 sequences. Figures: the median step time over the
measured rounds (after warm-up rounds), tokens/s = tokens per step / median step time, each step started after a
barrier and timed on rank 0 (every step ends in collectives that all ranks join).

Bubble, measured without instrumenting the schedule: the step time T(m) with m micro-batches and T(2m) with 2m
(same micro-batch size) give the time per extra micro-batch t = (T(2m) - T(m)) / m; what is left, T(m) - m t, is
the pipeline's fill and drain (plus fixed per-step costs: gradient averaging, optimizer); bubble = that / T(m).
Theory for pp ranks, v stages per rank: ((pp - 1) / v) / (m + (pp - 1) / v). Caveat: 4 processes share 2 cores, so
a rank idling in the bubble lends its core to the others; the measured bubble is not the one a real pipeline with
one device per stage would show.

    python benchmarks/layouts.py --json runs/layouts.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD = 4
COMMON = ["train.global_batch=16", "train.grad_accum=4", "train.eval_every=0", "checkpoint.every=0",
          "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "train.dtype=fp32"]
DOUBLE = ["train.global_batch=32", "train.grad_accum=8"]  # 2m micro-batches of the same size
LAYOUTS = {  # name: overrides
    "dp4-ep4": ["parallel.ep=4"],
    "dp2-ep2": ["parallel.ep=2"],
    "tp2-ep2": ["parallel.tp=2", "parallel.ep=2"],
    "tp2-folded-ep4": ["parallel.tp=2", "parallel.ep=4"],
    "etp2-ep2": ["parallel.ep=2", "parallel.etp=2"],
    "pp2-ep2": ["parallel.pp=2", "parallel.ep=2"],
    "pp2-tp2": ["parallel.pp=2", "parallel.tp=2"],
    "pp2-interleaved": ["parallel.pp=2", "parallel.pp_virtual=2", "parallel.ep=2"],
    "pp2-fssdp2": ["parallel.pp=2", "fssdp.policy=fssdp"],
    "pp2-ep2 (2m)": ["parallel.pp=2", "parallel.ep=2", *DOUBLE],
    "pp2-interleaved (2m)": ["parallel.pp=2", "parallel.pp_virtual=2", "parallel.ep=2", *DOUBLE],
}
BUBBLES = {"pp2-ep2": (2, 1), "pp2-interleaved": (2, 2)}  # name: (pp, stages per rank)


def worker(cfg_dicts: dict[str, dict], warmup: int, rounds: int) -> dict[str, list[float]] | None:
    import torch.distributed as dist

    from hecate.parallel.parallelize import Parallel
    from hecate.trainer.config import config_from_dict
    from hecate.trainer.train import Trainer

    trainers = {}
    for name, cfg_dict in cfg_dicts.items():
        cfg = config_from_dict(cfg_dict)
        parallel = Parallel.from_world(cfg.parallel, cfg.moe.num_experts, cfg.model.n_layers, cfg.model.n_heads,
                                       cfg.fssdp)
        trainers[name] = Trainer(cfg, parallel=parallel)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(warmup + rounds):
        for name, trainer in trainers.items():
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times if dist.get_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from hecate.launch.simulate import run_workers
    from hecate.parallel.pipeline import bubble_fraction
    from hecate.trainer.config import load_config

    runs = Path(tempfile.mkdtemp(prefix="layouts-"))
    cfgs = {name: load_config(ROOT / "examples/tiny.yaml", [
        f"data.dir={ROOT / 'data/stdlib'}", f"train.run_dir={runs / name.replace(' ', '')}", *COMMON, *overrides,
    ]).to_dict() for name, overrides in LAYOUTS.items()}
    times = run_workers(worker, WORLD, cfgs, args.warmup, args.rounds, timeout_s=1800)[0]
    rows = []
    for name, cfg in cfgs.items():
        median = statistics.median(times[name])
        tokens = cfg["train"]["global_batch"] * cfg["model"]["seq_len"]
        rows.append({"layout": name, "step_s_median": median, "tokens_per_s": tokens / median,
                     "step_s": times[name]})
    by_name = {r["layout"]: r for r in rows}
    for name, (pp, virtual) in BUBBLES.items():
        m = cfgs[name]["train"]["grad_accum"]
        once, twice = by_name[name]["step_s_median"], by_name[f"{name} (2m)"]["step_s_median"]
        per_micro = (twice - once) / m
        by_name[name]["bubble_measured"] = (once - m * per_micro) / once
        by_name[name]["bubble_theory"] = bubble_fraction(pp, virtual, m)
    print(f"{'layout':<22} {'step s (median)':>16} {'tokens/s':>10} {'bubble':>8} {'theory':>8}")
    for r in rows:
        bubble = f"{r['bubble_measured']:.1%}" if "bubble_measured" in r else ""
        theory = f"{r['bubble_theory']:.1%}" if "bubble_theory" in r else ""
        print(f"{r['layout']:<22} {r['step_s_median']:>16.3f} {r['tokens_per_s']:>10.0f} {bubble:>8} {theory:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"world": WORLD, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
