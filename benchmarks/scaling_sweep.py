"""Question: how much faster than expert parallelism is ``fssdp`` predicted to be on the literature's clusters,
from 16 to 1024 GPUs? (issue 11; docs/SCALING.md's table and plot come from this script)

For every cluster preset, model and size, the scale simulator (``hecate.trainer.scaling``, the same code as
``hecate simulate``) runs ``ep``, ``fsdp``, ``shadow`` and ``fssdp`` with the derived overlap budget, then
``fssdp`` again with each budget of ``--budgets``; "best t" is the budget with the shortest predicted step, the
choice Hecate's profiling makes. Writes a markdown table (stdout, and ``--markdown``), every result with its phase
breakdown (``--json``) and a plot of the speedups (``--plot``).

    python benchmarks/scaling_sweep.py --json runs/bench/scaling_sweep.json --plot docs/img/scaling_speedup.png
    python benchmarks/scaling_sweep.py --trace RUN/routing_trace.bin --trace-skip 60 --models examples/models/...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from hecate.trainer.scaling.report import DEFAULT_GPUS, run_simulation  # noqa: E402
from hecate.trainer.scaling.simulate import PolicyResult  # noqa: E402

CLUSTERS = (
    "examples/clusters/v100-100gbps.yaml",
    "examples/clusters/a100-400gbps.yaml",
    "examples/clusters/h100-400gbps-per-gpu.yaml",
)
MODELS = ("examples/models/gpt-moe-s.yaml", "examples/models/gpt-moe-l.yaml")
BASELINES = ("ep", "fsdp", "shadow", "fssdp")
VARIANTS = {"fssdp_best": "-", "fssdp": "--", "shadow": ":"}  # line style per speedup plotted
COLORS = {"v100-100gbps": "tab:red", "a100-400gbps": "tab:blue", "h100-400gbps-per-gpu": "tab:green"}


def sweep_pair(cluster: str, model: str, args: argparse.Namespace) -> list[dict]:
    """One row per size: every policy's step time, fssdp with the derived and the best budget."""

    def simulate(policies: list[str], budget: int | None) -> list[PolicyResult]:
        return run_simulation(
            cluster,
            model,
            policies,
            args.gpus,
            args.trace,
            args.zipf,
            [],
            args.tokens_per_gpu,
            args.steps,
            budget,
            None,
            False,
            None,
            True,
            args.seed,
            args.trace_skip,
        )

    derived = simulate(list(BASELINES), None)
    tuned = {t: simulate(["fssdp"], t) for t in args.budgets}
    rows = []
    for gpus in args.gpus:
        by_policy = {r.policy: r for r in derived if r.gpus == gpus}
        fssdp_by_t = {by_policy["fssdp"].overlap_budget: by_policy["fssdp"]}
        fssdp_by_t.update({t: next(r for r in results if r.gpus == gpus) for t, results in tuned.items()})
        best_t = min(fssdp_by_t, key=lambda t: (fssdp_by_t[t].step_s, t))
        ep_s = by_policy["ep"].step_s
        rows.append(
            {
                "cluster": Path(cluster).stem,
                "model": Path(model).stem,
                "gpus": gpus,
                "derived_t": by_policy["fssdp"].overlap_budget,
                "best_t": best_t,
                "step_ms": {
                    **{p: 1e3 * r.step_s for p, r in by_policy.items()},
                    "fssdp_best": 1e3 * fssdp_by_t[best_t].step_s,
                },
                "speedup_over_ep": {
                    **{p: ep_s / r.step_s for p, r in by_policy.items()},
                    "fssdp_best": ep_s / fssdp_by_t[best_t].step_s,
                },
                "fssdp_ms_by_t": {str(t): 1e3 * r.step_s for t, r in sorted(fssdp_by_t.items())},
                "results": [r.as_dict() for r in derived if r.gpus == gpus]
                + [{**fssdp_by_t[best_t].as_dict(), "policy": "fssdp_best"}],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| cluster | model | GPUs | ep ms | fssdp, derived t | x ep | fssdp, best t | x ep | shadow x ep | "
        "fsdp x ep | ep rows max/mean | fssdp best rows max/mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, x = r["step_ms"], r["speedup_over_ep"]
        spread = {res["policy"]: res["rows_max_over_mean"] for res in r["results"]}
        lines.append(
            f"| {r['cluster']} | {r['model']} | {r['gpus']} | {ms['ep']:.1f} | t={r['derived_t']}: "
            f"{ms['fssdp']:.1f} | {x['fssdp']:.2f} | t={r['best_t']}: {ms['fssdp_best']:.1f} | "
            f"**{x['fssdp_best']:.2f}** | {x['shadow']:.2f} | {x['fsdp']:.2f} | {spread['ep']:.2f} | "
            f"{spread['fssdp_best']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per model: speedup over ep against GPUs, a colour per cluster; solid fssdp with the best budget,
    dashed fssdp with the derived budget, dotted shadow."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.5 * len(models), 9), 4.2), squeeze=False, sharey=True)
    for axis, model in zip(axes[0], models):
        for cluster in dict.fromkeys(r["cluster"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["cluster"] == cluster]
            gpus = [r["gpus"] for r in mine]
            color = COLORS.get(cluster)
            for key, style in VARIANTS.items():
                axis.plot(gpus, [r["speedup_over_ep"][key] for r in mine], style, marker="o", markersize=3, color=color)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.fill_between([16, 32], 1.26, 1.78, color="grey", alpha=0.25, linewidth=0)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({r["gpus"] for r in rows}), [str(g) for g in sorted({r["gpus"] for r in rows})])
        axis.set_xlabel("GPUs")
        axis.set_title(model)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over ep")
    handles = (
        [Line2D([], [], color=COLORS.get(c), label=c) for c in dict.fromkeys(r["cluster"] for r in rows)]
        + [
            Line2D([], [], color="black", linestyle=style, label=label)
            for label, style in (("fssdp, best t", "-"), ("fssdp, derived t", "--"), ("shadow", ":"))
        ]
        + [Patch(color="grey", alpha=0.25, label="published 1.26-1.78x")]
    )
    columns = min(len(handles), 4 * len(models))
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=columns)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(handles) / columns), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", nargs="+", default=list(CLUSTERS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--gpus", type=int, nargs="+", default=list(DEFAULT_GPUS))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--zipf", type=float, default=None, help="Zipf exponent (default 1.0 without --trace)")
    source.add_argument("--trace", default=None, help="routing trace (hecate train --record-routing)")
    parser.add_argument("--trace-skip", type=int, default=0, help="replay the trace from its (N+1)-th step")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="overlap budgets tried for fssdp's best t"
    )
    parser.add_argument("--steps", type=int, default=2, help="measured steps after the load window")
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the speedups")
    parser.add_argument("--replot", type=Path, default=None, help="draw --plot from this --json file, simulate nothing")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["rows"], args.plot, saved["title"])
        return
    if args.trace is None and args.zipf is None:
        args.zipf = 1.0
    rows, started = [], time.perf_counter()
    for model in args.models:
        for cluster in args.clusters:
            rows += sweep_pair(cluster, model, args)
            print(
                f"# {Path(model).stem} on {Path(cluster).stem}: done after {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    table = markdown(rows)
    print(table)
    source = f"trace {args.trace} from step {args.trace_skip + 1}" if args.trace else f"Zipf s={args.zipf}"
    title = f"Predicted speedup over ep, {source}, {args.tokens_per_gpu} tokens per GPU"
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "inputs": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "title": title,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    if args.plot:
        plot(rows, args.plot, title)
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
