"""The charts of docs/BENCHMARKS.md, drawn from the benchmarks' JSON rows (whichever of them exist).

    python benchmarks/plot.py runs/bench --out docs/img

- ``peers.png`` (from ``peers.json``): each system's median step time, one column per (ranks, routing skew), min-max
  whiskers, with
  the compute floor and the compute + communication floor as lines; below, the CPU time of all ranks per step
  beside the GEMM work (the layer's FLOPs at the single-thread rate);
- ``end_to_end.png`` (from ``end_to_end.json``): the demo model's tokens/s and MFU on 1, 2 and 4 ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "hecate-ep": "tab:blue",
    "hecate-fssdp": "tab:cyan",
    "deepspeed-dropless": "tab:orange",
    "deepspeed-cf1": "tab:red",
}


def plot_peers(rows: list[dict], out: Path) -> None:
    cases = sorted({(r["world_size"], r.get("skew", 0.0)) for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["world_size"], r.get("skew", 0.0), r["system"]): r for r in rows}
    fig, axes = plt.subplots(2, len(cases), figsize=(5 * len(cases), 7.5), squeeze=False)
    for ax, cpu_ax, (world, skew) in zip(axes[0], axes[1], cases):
        by_system = {s: by[world, skew, s] for s in systems if (world, skew, s) in by}
        present = list(by_system)
        medians = [by_system[s]["step_ms"] for s in present]
        lower = [m - by_system[s]["step_ms_min"] for m, s in zip(medians, present)]
        upper = [by_system[s]["step_ms_max"] - m for m, s in zip(medians, present)]
        ax.bar(
            range(len(present)),
            medians,
            yerr=[lower, upper],
            capsize=4,
            color=[COLORS.get(s, "tab:gray") for s in present],
        )
        first = by_system[present[0]]
        compute, comm = first["compute_floor_ms"], first["comm_floor_ms"]
        ax.axhline(compute, color="black", linestyle="--", linewidth=1, label=f"compute floor {compute:.0f} ms")
        ax.axhline(
            compute + comm,
            color="gray",
            linestyle=":",
            linewidth=1,
            label=f"+ all-to-all floor {compute + comm:.0f} ms",
        )
        for i, s in enumerate(present):
            ax.annotate(
                f"{by_system[s]['x_compute_floor']:.2f}x",
                (i, medians[i]),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_xticks(range(len(present)), [s.replace("-", "\n", 1) for s in present], fontsize=8)
        ax.set_title(f"{world} ranks, one thread each, routing Zipf s = {skew:g}", fontsize=10)
        ax.set_ylabel("step time, ms (median, min-max)")
        ax.legend(fontsize=8, loc="lower right")
        cpu = [by_system[s]["cpu_ms_all_ranks"] for s in present]
        cpu_ax.bar(range(len(present)), cpu, color=[COLORS.get(s, "tab:gray") for s in present])
        floor_cpu = cpu[0] / by_system[present[0]]["cpu_x_floor_flops"]
        cpu_ax.axhline(floor_cpu, color="black", linestyle="--", linewidth=1, label=f"GEMM work {floor_cpu:.0f} ms")
        for i, s in enumerate(present):
            cpu_ax.annotate(
                f"{by_system[s]['cpu_x_floor_flops']:.2f}x",
                (i, cpu[i]),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        cpu_ax.set_xticks(range(len(present)), [s.replace("-", "\n", 1) for s in present], fontsize=8)
        cpu_ax.set_ylabel("CPU time, all ranks, ms (median)")
        cpu_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("One MoE layer, forward + backward (labels: x floor)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_end_to_end(rows: list[dict], out: Path) -> None:
    rows = sorted(rows, key=lambda r: r["world_size"])
    worlds = [r["world_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    tokens = [r["tokens_per_s"] for r in rows]
    lower = [t - r["tokens_per_s_min_max"][0] for t, r in zip(tokens, rows)]
    upper = [r["tokens_per_s_min_max"][1] - t for t, r in zip(tokens, rows)]
    left.bar([str(w) for w in worlds], tokens, yerr=[lower, upper], capsize=4, color="tab:blue")
    left.set_xlabel("simulated ranks")
    left.set_ylabel("tokens/s (median, min-max)")
    right.bar([str(w) for w in worlds], [100 * r["mfu"] for r in rows], color="tab:green")
    right.set_xlabel("simulated ranks")
    right.set_ylabel(f"MFU, % of {rows[0]['peak_gflops']:.0f} GFLOP/s")
    fig.suptitle(f"Demo model (examples/tiny.yaml), {rows[0]['dtype']}, training")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLOTS = {"peers.json": ("peers.png", plot_peers), "end_to_end.json": ("end_to_end.png", plot_end_to_end)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="folder with the benchmarks' JSON files")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for source, (name, draw) in PLOTS.items():
        path = args.results / source
        if path.exists():
            draw(json.loads(path.read_text()), args.out / name)
            print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
