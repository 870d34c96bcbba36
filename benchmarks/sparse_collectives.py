"""Question: when only a fraction of the (chunk, device) pairs need a replica, how much faster is
SparseAllGather than a plain all-gather of every chunk? Same chunks, same ranks, torch-gloo and MPI.

The plain all-gather runs on chunks already packed in one buffer into a reused output (its best case);
the sparse one includes its default agreement all-gather and hands its received replicas back after each call
(``release``), so it measures a caller that keeps one SparseAllGather per placement and reuses its receive memory.
A configuration's time is the median over iterations of the slowest rank's time.

    python benchmarks/sparse_collectives.py --json runs/sparse_collectives.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hecate.collectives import (
    ChunkSpec,
    MaterializedPlacement,
    OwnerPlacement,
    SparseAllGather,
    Transport,
    delta,
)


@dataclass(frozen=True)
class Config:
    world_size: int = 4
    chunks: int = 32
    chunk_kib: int = 1024
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    iters: int = 15
    warmup: int = 3
    seed: int = 0


def round_robin_owner(config: Config) -> OwnerPlacement:
    return OwnerPlacement(tuple(c % config.world_size for c in range(config.chunks)), config.world_size)


def materialize(config: Config, fraction: float) -> MaterializedPlacement:
    """``fraction`` of the non-owner (chunk, device) pairs get a replica, chosen with a fixed seed."""
    world = config.world_size
    owner = round_robin_owner(config)
    candidates = [(c, d) for c in range(config.chunks) for d in range(world) if d != c % world]
    chosen = random.Random(config.seed).sample(candidates, round(fraction * len(candidates)))
    return MaterializedPlacement.from_owner(owner, chosen)


def _slowest_rank_s(transport: Transport, seconds: float) -> float:
    slowest = torch.tensor([seconds], dtype=torch.float64)
    transport.all_reduce(slowest, reduce="max", name="bench.timing").wait()
    return slowest.item()


def _total_over_ranks(transport: Transport, value: int) -> int:
    total = torch.tensor([value], dtype=torch.int64)
    transport.all_reduce(total, name="bench.timing").wait()
    return int(total.item())


def _median_s(transport: Transport, config: Config, step) -> float:
    times = []
    for i in range(config.warmup + config.iters):
        transport.barrier(name="bench.barrier").wait()
        start = time.perf_counter()
        step()
        seconds = _slowest_rank_s(transport, time.perf_counter() - start)
        if i >= config.warmup:
            times.append(seconds)
    return statistics.median(times)


def _bytes_sent(transport: Transport, name: str, step) -> int:
    before = transport.stats.snapshot()
    step()
    return _total_over_ranks(transport, delta(transport.stats.snapshot(), before)[name].bytes_sent)


def measure(transport: Transport, config: Config, label: str) -> list[dict]:
    """Rows (on every rank) for one transport: one per replica fraction."""
    spec = ChunkSpec.flat(config.chunk_kib * 256)
    world, rank = transport.world_size, transport.rank
    owner = round_robin_owner(config)
    owned = {c: torch.randn(spec.shape) for c in owner.chunks_on(rank)}
    packed = torch.cat(list(owned.values()))
    gathered = torch.empty(packed.numel() * world)

    def plain() -> None:
        transport.all_gather(gathered, packed, name="plain_all_gather").wait()

    plain_s = _median_s(transport, config, plain)
    plain_bytes = _bytes_sent(transport, "plain_all_gather", plain)
    rows = []
    for fraction in config.fractions:
        materialized = materialize(config, fraction)
        gather = SparseAllGather(owner, materialized, spec, transport)

        def sparse(gather: SparseAllGather = gather) -> None:
            gather.release(gather(owned))  # the replicas' memory serves the next call

        sparse_s = _median_s(transport, config, sparse)
        sparse_bytes = _bytes_sent(transport, "sparse_all_gather", sparse)
        replicas = sum(len(devices) - 1 for devices in materialized.devices_C)
        assert sparse_bytes == replicas * spec.nbytes
        rows.append(
            {
                "transport": label,
                "world_size": world,
                "chunks": config.chunks,
                "chunk_bytes": spec.nbytes,
                "fraction": fraction,
                "replicas": replicas,
                "sparse_median_ms": round(sparse_s * 1e3, 3),
                "plain_median_ms": round(plain_s * 1e3, 3),
                "sparse_bytes": sparse_bytes,
                "plain_bytes": plain_bytes,
                "time_ratio": round(sparse_s / plain_s, 3),
                "bytes_ratio": round(sparse_bytes / plain_bytes, 3),
            }
        )
    return rows


def gloo_worker(config: Config) -> list[dict]:
    from hecate.collectives import TorchTransport

    return measure(TorchTransport(), config, "torch-gloo")


def mpi_worker(config: Config, out: str) -> None:
    from hecate.collectives import MpiTransport

    torch.set_num_threads(1)
    transport = MpiTransport()
    rows = measure(transport, config, "mpi")
    if transport.rank == 0:
        Path(out).write_text(json.dumps(rows))


def run_gloo(config: Config) -> list[dict]:
    from hecate.launch.simulate import run_workers

    return run_workers(gloo_worker, config.world_size, config, timeout_s=1200)[0]


def run_mpi(config: Config) -> list[dict]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "rows.json")
        command = [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(config.world_size),
            sys.executable,
            __file__,
            "--mpi-worker",
            json.dumps(asdict(config)),
            str(out),
        ]
        subprocess.run(command, check=True, timeout=1200)
        return json.loads(out.read_text())


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'transport':<11}{'fraction':>9}{'replicas':>9}{'sparse ms':>11}{'plain ms':>10}"
        f"{'sparse MiB':>11}{'plain MiB':>10}{'time ratio':>11}{'bytes ratio':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['transport']:<11}{r['fraction']:>9}{r['replicas']:>9}{r['sparse_median_ms']:>11.2f}"
            f"{r['plain_median_ms']:>10.2f}{r['sparse_bytes'] / 2**20:>11.1f}{r['plain_bytes'] / 2**20:>10.1f}"
            f"{r['time_ratio']:>11.3f}{r['bytes_ratio']:>12.3f}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--mpi-worker":
        config = json.loads(sys.argv[2])
        mpi_worker(Config(**config | {"fractions": tuple(config["fractions"])}), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--transports", nargs="+", default=["gloo", "mpi"], choices=["gloo", "mpi"])
    parser.add_argument("--world-size", type=int, default=defaults.world_size)
    parser.add_argument("--chunks", type=int, default=defaults.chunks)
    parser.add_argument("--chunk-kib", type=int, default=defaults.chunk_kib)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(defaults.fractions))
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--json", type=Path, help="write one JSON object per configuration to this file")
    args = parser.parse_args()
    config = Config(args.world_size, args.chunks, args.chunk_kib, tuple(args.fractions), args.iters, args.warmup)
    runners = {"gloo": run_gloo, "mpi": run_mpi}
    rows = [row for name in args.transports for row in runners[name](config)]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
