"""Question: how fast does the demo model (examples/tiny.yaml) train on 4 simulated ranks under each tensor /
pipeline / expert-tensor layout (issue 7), next to plain DP x EP, and how large is the pipeline bubble measured
against the schedule's theory?

All layouts live in one group of 4 worker processes (gloo, one thread each; this machine has 2 cores, shared) and
take turns step by step (A B C ... A B C ...), so that background load falls on all alike. Every layout trains the
same 16 sequences x 128 tokens per step as 4 micro-batches of 4 sequences. Figures: the median step time over the
measured rounds (after warm-up rounds), tokens/s = tokens per step / median step time, each step started after a
barrier and timed on rank 0 (every step ends in collectives that all ranks join).

Bubble: on every rank, the share of the schedule's ``step`` (all forwards and backwards of the step's m
micro-batches) that is not spent inside its stages' forward or backward of a micro-batch - waiting for activations
or gradients from the neighbour stage (fill and drain, plus the transfers); the mean over ranks. Theory for pp ranks,
v stages per rank and equal stage times: ((pp - 1) / v) / (m + (pp - 1) / v). Caveat: 4 processes share 2 cores, so
a rank idling in the bubble lends its core to the others (and the stages are not equally fast: the last one holds
the head); the measured bubble is not the one a real pipeline with one device per stage would show.

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
COMMON = [
    "train.global_batch=16",
    "train.grad_accum=4",
    "train.eval_every=0",
    "checkpoint.every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.plots=false",
    "train.dtype=fp32",
]
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
}


class BusyClock:
    """Time spent inside a pipeline's stage forwards and backwards, and inside its schedule's steps."""

    def __init__(self, pipeline):
        self.busy = self.total = 0.0
        for stage in pipeline.stages:
            for method in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(stage, method, self._timed(getattr(stage, method), "busy"))
        # the last stage's loss (head logits -> cross-entropy) is work too; the schedule computes it outside its stage
        pipeline.schedule._maybe_compute_loss = self._timed(pipeline.schedule._maybe_compute_loss, "busy")
        pipeline.schedule.step = self._timed(pipeline.schedule.step, "total")

    def _timed(self, fn, counter: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)

        return timed


def worker(cfg_dicts: dict[str, dict], warmup: int, rounds: int) -> dict[str, list[float]] | None:
    import torch.distributed as dist

    from hecate.parallel.parallelize import Parallel
    from hecate.trainer.config import config_from_dict
    from hecate.trainer.plan import layout_of
    from hecate.trainer.train import Trainer

    trainers = {}
    for name, cfg_dict in cfg_dicts.items():
        cfg = config_from_dict(cfg_dict)
        parallel = Parallel.from_world(layout_of(cfg, dist.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp)
        trainers[name] = Trainer(cfg, parallel=parallel)
    clocks = {name: BusyClock(t.parallel.pipeline) for name, t in trainers.items() if t.parallel.pipeline}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(warmup + rounds):
        for name, trainer in trainers.items():
            dist.barrier()
            if step == warmup and name in clocks:
                clocks[name].busy = clocks[name].total = 0.0
            start = time.perf_counter()
            trainer.train_step(step)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    idle = {name: 1 - clock.busy / clock.total for name, clock in clocks.items()}
    every_rank: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, idle)
    bubbles = {name: statistics.mean(rank[name] for rank in every_rank) for name in clocks}
    return {"times": times, "bubbles": bubbles} if dist.get_rank() == 0 else None


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
    cfgs = {
        name: load_config(
            ROOT / "examples/tiny.yaml",
            [
                f"data.dir={ROOT / 'data/stdlib'}",
                f"train.run_dir={runs / name.replace(' ', '')}",
                *COMMON,
                *overrides,
            ],
        ).to_dict()
        for name, overrides in LAYOUTS.items()
    }
    measured = run_workers(worker, WORLD, cfgs, args.warmup, args.rounds, timeout_s=1800)[0]
    times = measured["times"]
    rows = []
    for name, cfg in cfgs.items():
        median = statistics.median(times[name])
        tokens = cfg["train"]["global_batch"] * cfg["model"]["seq_len"]
        rows.append({"layout": name, "step_s_median": median, "tokens_per_s": tokens / median, "step_s": times[name]})
    for row in rows:
        if row["layout"] in measured["bubbles"]:
            parallel = cfgs[row["layout"]]["parallel"]
            row["bubble_measured"] = measured["bubbles"][row["layout"]]
            row["bubble_theory"] = bubble_fraction(
                parallel["pp"], parallel["pp_virtual"], cfgs[row["layout"]]["train"]["grad_accum"]
            )
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
