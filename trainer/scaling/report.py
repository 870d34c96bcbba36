"""``hecate simulate``: read the inputs, run the simulator, print the table, write results.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from hecate.collectives.errors import ConfigError
from hecate.trainer.config import load_config
from hecate.trainer.routing_trace import read_trace
from hecate.trainer.scaling.cluster import load_cluster
from hecate.trainer.scaling.cost import Overlap
from hecate.trainer.scaling.loads import TraceRouting, ZipfRouting
from hecate.trainer.scaling.simulate import PolicyResult, Settings, simulate, speedups
from hecate.trainer.scaling.workload import Workload

DEFAULT_GPUS = (16, 32, 64, 128, 256, 512, 1024)
PHASES = ("attention", "experts", "all_to_all", "gather", "reduce_scatter", "gradient_sync")


def run_simulation(
    cluster_path: str,
    model_path: str,
    policies: list[str],
    gpus: list[int],
    trace: str | None,
    zipf: float | None,
    overrides: list[str],
    tokens_per_gpu: int,
    steps: int,
    overlap_budget: int | None,
    memory_budget: int | None,
    rematerialize: bool,
    reshard_every: int | None,
    overlap_reduce_scatter: bool,
    seed: int = 0,
    trace_skip: int = 0,
) -> list[PolicyResult]:
    """Validate every input (errors name the flag or field) before simulating anything."""
    if (trace is None) == (zipf is None):
        raise ConfigError("--trace/--zipf", "give exactly one routing source: a recorded trace or a Zipf exponent")
    if steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {steps}")
    cfg = load_config(model_path, overrides)
    cluster = load_cluster(cluster_path)
    workload = Workload.from_config(cfg, tokens_per_gpu)
    if not workload.moe_layers:
        raise ConfigError("moe.every", f"the model has no MoE layer (n_layers={cfg.model.n_layers})")
    fssdp = cfg.fssdp
    window = fssdp.window
    routing = (
        TraceRouting(read_trace(trace), workload.num_experts, len(workload.moe_layers), trace_skip)
        if trace
        else ZipfRouting(zipf, workload.num_experts, len(workload.moe_layers), window + steps, seed)
    )
    settings = [
        Settings(
            gpus=n,
            overlap_budget=overlap_budget,
            memory_budget=fssdp.memory_budget if memory_budget is None else memory_budget,
            min_imbalance=fssdp.min_imbalance,
            window=window,
            reshard_every=fssdp.reshard_every if reshard_every is None else reshard_every,
            rematerialize=rematerialize,
            steps=steps,
            overlap=Overlap(gather=True, reduce_scatter=overlap_reduce_scatter),
        )
        for n in gpus
    ]
    return simulate(workload, cluster, routing, policies, settings)


def table(results: list[PolicyResult]) -> str:
    ratio = speedups(results)
    head = (
        f"{'gpus':>5} {'policy':<7} {'step ms':>9} {'x ep':>6} "
        + " ".join(f"{p:>{_width(p)}}" for p in PHASES)
        + f" {'mem GiB':>8} {'replicas':>8} {'rows max/mean':>13} {'t':>3}"
    )
    lines = [head]
    for r in results:
        phases = r.phases.as_dict()
        lines.append(
            f"{r.gpus:>5} {r.policy:<7} {1e3 * r.step_s:>9.1f} {ratio.get((r.gpus, r.policy), float('nan')):>6.2f} "
            + " ".join(f"{1e3 * phases[p]:>{_width(p)}.1f}" for p in PHASES)
            + f" {sum(r.memory.values()) / 2**30:>8.2f} {r.replicas_per_device:>8.2f}"
            f" {r.rows_max_over_mean:>13.2f} {r.overlap_budget:>3}"
        )
    return "\n".join(lines)


def write_outputs(results: list[PolicyResult], out: Path, title: str, inputs: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    ratio = speedups(results)
    rows = [{**r.as_dict(), "speedup_over_ep": ratio.get((r.gpus, r.policy))} for r in results]
    (out / "results.json").write_text(json.dumps({"inputs": inputs, "results": rows}, indent=1) + "\n")
    return [out / "results.json", plot(results, out / "step_time.png", title)]


def plot(results: list[PolicyResult], path: Path, title: str) -> Path:
    """Step time per policy over cluster size, and each policy's speedup over ep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in dict.fromkeys(r.policy for r in results):
        mine = [r for r in results if r.policy == policy]
        left.plot([r.gpus for r in mine], [1e3 * r.step_s for r in mine], marker="o", label=policy)
        right.plot(
            [r.gpus for r in mine], [ratio.get((r.gpus, policy), float("nan")) for r in mine], marker="o", label=policy
        )
    for axis, label in ((left, "step time (ms)"), (right, "speedup over ep")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("GPUs")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _width(phase: str) -> int:
    """A phase column is as wide as its name (at least 9), so that headers are never cut."""
    return max(9, len(phase))
