"""Overlap changes when things happen, never what is computed: chunked dispatch/compute/combine, sub-batches
interleaved through a block (one's attention while another's tokens travel), the FSSDP backward reduce-scatter
waited at the end of backward, the prefetched re-gather and the simulated network all reproduce the
single-process run (tests/parity.py's tolerances). The simulated network delays without burning CPU, a late
sender's rows arrive a whole transfer after it sends them, and a profiled step's trace has the compute track and
a track per collective. The overlap benchmark writes the figures the issue names, each derived as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from parity import GRAD_RTOL_LONG, assert_matches, small_config, train, train_one

from hecate.collectives import TorchTransport
from hecate.collectives.simulated_network import SimulatedNetwork, SimulatedNetworkTransport
from hecate.collectives.timeline import Timeline
from hecate.launch.cli import main
from hecate.launch.simulate import run_workers

pytestmark = pytest.mark.slow  # starts processes

STEPS = 2
EXPERTS = 8
CASES = {  # name: (overrides, simulated network or None)
    "ep-chunks3": (["parallel.ep=2", "moe.overlap_chunks=3"], None),
    "ep-chunks3-capacity-network": (
        ["parallel.ep=2", "moe.overlap_chunks=3", "moe.capacity_factor=1.0"],
        SimulatedNetwork(2, 5.0, 50.0),
    ),
    "fsdp-rm-chunks2": (["fssdp.policy=fsdp", "fssdp.rematerialize=true", "moe.overlap_chunks=2"], None),
    "fssdp-chunks3-network": (["fssdp.policy=fssdp", "moe.overlap_chunks=3"], SimulatedNetwork(2, 5.0, 50.0)),
    "ep-sub2-chunks2-network": (
        ["parallel.ep=2", "moe.overlap_sub_batches=2", "moe.overlap_chunks=2"],
        SimulatedNetwork(2, 5.0, 50.0),
    ),
    "fssdp-rm-sub2": (["fssdp.policy=fssdp", "fssdp.rematerialize=true", "moe.overlap_sub_batches=2"], None),
}
CASES_4 = {  # one case: 4 processes share the 2 cores of CI
    "fssdp-rm-chunks2-network": (
        ["fssdp.policy=fssdp", "fssdp.rematerialize=true", "moe.overlap_chunks=2"],
        SimulatedNetwork(2, 5.0, 20.0),
    ),
}
COMMON = [f"moe.num_experts={EXPERTS}"]
# 0.08 Gbit/s = 10 MB/s: the ~1 MB each rank sends to the other node takes ~100 ms on the simulated link
SLOW = SimulatedNetwork(2, 0.08, 1000.0)
SLOW_BYTES = 1_000_000  # sent by each rank, split evenly over its peers
LATE_S = 0.3  # the last rank issues the second exchange this late


def _slow_exchange() -> dict:
    """One all-to-all over the SLOW link: wall time, this process's CPU time while waiting, and the numbers; then
    one that the last rank issues LATE_S late: the first rank's wall time (its data arrives a transfer later)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    transport = SimulatedNetworkTransport(TorchTransport(), SLOW, [SLOW.node_of(r, world) for r in range(world)])
    rows = SLOW_BYTES // (4 * 1000 * (world - 1))
    x = torch.full((rows * world, 1000), float(rank))
    out = torch.empty_like(x)
    start, cpu = time.monotonic(), time.process_time()
    handle = transport.all_to_all(out, x, [rows] * world, [rows] * world)
    handle.wait()
    wall_s, cpu_s = time.monotonic() - start, time.process_time() - cpu
    wait_s = transport.stats.snapshot()["all_to_all"].wait_s
    remote = sum(SLOW.node_of(r, world) != SLOW.node_of(rank, world) for r in range(world))
    correct = torch.equal(out, torch.arange(world).float().repeat_interleave(rows)[:, None].expand_as(out))
    dist.barrier()
    start = time.monotonic()
    if rank == world - 1:
        time.sleep(LATE_S)
    transport.all_to_all(out, x, [rows] * world, [rows] * world).wait()
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "wait_s": wait_s,
        "correct": correct,
        "modeled_s": SLOW.transfer_s(remote * rows * 4000) + SLOW.latency_us * 1e-6,
        "late_wall_s": time.monotonic() - start,
    }


def _worker(cases: dict, cfg_dicts: list[dict], profile_first: bool) -> dict | None:
    exchange = _slow_exchange()
    results = {
        name: train_one(
            cfg,
            True,
            skew=True,
            profile_step=2 if profile_first and i == 0 else 0,
            network=cases[name][1],
            timeline=Timeline(dist.get_rank()),
        )
        for i, (name, cfg) in enumerate(zip(cases, cfg_dicts))
    }
    return {"exchange": exchange, "results": results} if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    cfg = small_config(small_data, tmp_path_factory.mktemp("ref"), COMMON, STEPS).to_dict()
    return train([cfg], distributed=False, skew=True)[0]


@pytest.fixture(scope="module")
def reference_capacity(small_data, tmp_path_factory):
    cfg = small_config(
        small_data, tmp_path_factory.mktemp("ref-cap"), COMMON + ["moe.capacity_factor=1.0"], STEPS
    ).to_dict()
    return train([cfg], distributed=False, skew=True)[0]


@pytest.mark.parametrize("world,cases", [(2, CASES), (4, CASES_4)], ids=["2ranks", "4ranks"])
def test_overlap_and_simulated_network_match_single_process(
    world, cases, reference, reference_capacity, small_data, tmp_path
):
    cfgs = [
        small_config(small_data, tmp_path / name, COMMON + overrides, STEPS).to_dict()
        for name, (overrides, _) in cases.items()
    ]
    got = run_workers(_worker, world, cases, cfgs, world == 2, timeout_s=600)[0]
    for name, result in got["results"].items():
        want = reference_capacity if "capacity" in name else reference
        assert_matches(result, want, f"{name} on {world} ranks", grad_rtol=GRAD_RTOL_LONG)
    if world == 2:
        assert sum(got["results"]["ep-chunks3-capacity-network"]["dropped"]) > 0, "capacity dropped nothing"

    exchange = got["exchange"]
    modeled = exchange["modeled_s"]
    assert exchange["correct"], "the simulated network changed the exchanged values"
    assert exchange["wall_s"] >= modeled * 0.99, f"{exchange['wall_s']:.3f} s < modeled {modeled:.3f} s"
    assert exchange["wait_s"] >= modeled * 0.5, "the modeled delay must count as wait time"  # less issue time
    assert exchange["cpu_s"] < 0.5 * exchange["wall_s"], f"the delay burnt CPU: {exchange}"
    assert exchange["late_wall_s"] >= (LATE_S + modeled) * 0.99, (
        f"rank 0 got the late rank's rows before they could cross the link: {exchange}"
    )

    if world == 2:
        events = got["results"]["ep-chunks3"]["trace"]["traceEvents"]
        tracks = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
        for rank in range(world):
            for track in ("compute", "moe.dispatch", "moe.combine", "moe.dispatch.backward", "moe.combine.backward"):
                assert (rank, track) in tracks, f"rank {rank} has no {track} track in {sorted(tracks)}"
        spans = [e["name"] for e in events if e["ph"] == "X" and e["pid"] == 0]
        assert spans.count("moe.dispatch") == 3 * 2 * 2, "one dispatch per chunk, layer and micro-batch"
        assert {"blocks.0.attn forward", "blocks.0.attn backward", "blocks.1.ffn.experts backward"} <= set(spans)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--simulate", "2", "--sim-nodes", "3", "--sim-inter-node-gbps", "1"], "--sim-nodes 3"),
        (["--simulate", "2", "--sim-nodes", "2", "--sim-inter-node-gbps", "0"], "--sim-inter-node-gbps 0"),
        (["--sim-nodes", "2", "--sim-inter-node-gbps", "1"], "needs --simulate"),
        (["--sim-bind-cores"], "--sim-bind-cores binds simulated ranks to cores: it needs --simulate N"),
        (["--simulate", "2", "-o", "moe.overlap_chunks=0", "--profile-step", "1"], "moe.overlap_chunks"),
        (["--simulate", "2", "--profile-step", "-1"], "logging.profile_step"),
        (["-o", "moe.overlap_sub_batches=2", "-o", "moe.capacity_factor=1.0"], "moe.overlap_sub_batches"),
        (["--simulate", "2", "-o", "parallel.tp=2", "-o", "moe.overlap_sub_batches=2"], "moe.overlap_sub_batches"),
    ],
)
def test_bad_overlap_options_are_refused_before_workers_start(args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "examples/tiny.yaml", "-o", f"train.run_dir={run_dir}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_overlap_benchmark_writes_its_rows(tmp_path):
    """Two iterations of benchmarks/overlap.py on 2 ranks: a loopback and a simulated row with step times,
    communication and compute time and the hidden fractions, derived as its docstring says (its numbers are
    measured by the benchmark itself, not here)."""
    out = tmp_path / "overlap.json"
    subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "benchmarks/overlap.py",
            "--shapes",
            "demo",
            "--ranks",
            "2",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())
    assert [r["network"] for r in rows] == ["loopback", "simulated"]
    for r in rows:
        assert r["t_blocked_ms"] >= r["t_comm_ms"] > 0  # the waits for slower ranks come on top of the exchanges
        assert r["t_compute_ms"] == pytest.approx(max(r["t_off_ms"] - r["t_blocked_ms"], 0))
        hideable = min(r["t_comm_ms"], r["t_compute_ms"])
        assert r["hidden"] == pytest.approx(r["saved_ms"] / hideable)
        assert r["hidden_with_waits"] == pytest.approx(r["saved_ms"] / min(r["t_blocked_ms"], r["t_compute_ms"]))
        assert r["bind_cores"] and r["chunks"] == 2 and r["sub_batches"] == 2
        ratios = [on / off for off, on in zip(r["times_ms"]["off"], r["times_ms"]["on"])]
        assert len(ratios) == 2 and r["on_over_off"] == pytest.approx(sum(ratios) / 2, rel=1e-3)
        assert r["on_over_off_ci90"] == pytest.approx([min(ratios), max(ratios)], rel=1e-3)  # 2 values: the range
        saved = sorted(off - on for off, on in zip(r["times_ms"]["off"], r["times_ms"]["on"]))
        assert r["hidden_ci90"] == pytest.approx([v / hideable for v in saved], abs=5e-3)  # times_ms: 0.01 ms
    assert rows[1]["inter_node_gbps"] > 0 and "link_hidden" in rows[1]


def test_median_confidence_interval_is_from_order_statistics():
    """15 values: P(Binomial(15, 1/2) <= 3) = 1.8% <= 5% < P(<= 4) = 5.9%, so the 90% interval is the 4th to the
    12th smallest; 21 values: the 7th to the 15th."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from overlap import median_ci

    assert median_ci([float(v) for v in range(15, 0, -1)]) == (4.0, 12.0)
    assert median_ci([float(v) for v in range(1, 22)]) == (7.0, 15.0)
    assert median_ci([3.0]) == (3.0, 3.0)
