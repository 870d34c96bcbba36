"""The FSSDP engine's measured side: ``auto`` budgets derived from the group's agreed measurements, and calibration
of each forward's plan with the router's real counts. Both change only where experts are computed, never the
math: 8 steps on 2 simulated ranks match the single-process reference (losses, every step's gradients, final
weights; tolerances as in tests/parity.py). The router's choice is skewed, and the skew moves to other experts
every step, so the load estimate is always wrong and calibration has something to correct."""

from __future__ import annotations

import pytest
import torch
from parity import GRAD_RTOL_LONG, SKEW, assert_matches, small_config

from hecate.collectives import CommStats, TorchTransport
from hecate.launch.simulate import run_workers
from hecate.parallel.fssdp import memory_budget, replica_bytes
from hecate.parallel.fssdp.measured import Measurements
from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import config_from_dict
from hecate.trainer.plan import layout_of
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow

STEPS = 8
EXPERTS = 8
COMMON = [f"moe.num_experts={EXPERTS}", "fssdp.window=1"]
CASES = {
    "auto": ["fssdp.policy=fssdp", "fssdp.overlap_budget=auto", "fssdp.memory_budget=auto"],
    "auto-capped-rm": [
        "fssdp.policy=fssdp",
        "fssdp.overlap_budget=auto",
        "fssdp.memory_budget=auto",
        "fssdp.memory_cap_mib=1",
        "fssdp.rematerialize=true",
    ],
    "calibrate": ["fssdp.policy=fssdp", "fssdp.calibrate=true", "fssdp.overlap_budget=4", "fssdp.memory_budget=1"],
    "calibrate-rm": ["fssdp.policy=fssdp", "fssdp.calibrate=true", "fssdp.rematerialize=true"],
}
# Seconds per expert row fed to calibration in the "fixed costs" runs: far above this CPU's, so that every
# forward whose real counts differ from the estimate is corrected (the rule itself: test_fssdp_calibration.py).
SLOW_ROW_S = 1e-3
EXPERT_PARAMS = 2 * 64 * 64  # model.dim x moe.ffn_dim, two matrices (gelu)
CAPPED_M = memory_budget(2**20, replica_bytes(EXPERT_PARAMS, 4), EXPERTS, 2, layers_alive=2)


def rotated_skew(step: int) -> torch.Tensor:
    """The router's selection offsets of ``step``: the popular experts change every step."""
    return torch.tensor(SKEW[:EXPERTS]).roll(3 * step)


def train_rotating(cfg_dicts: list[dict], distributed: bool, fixed_costs: list[bool]) -> list[dict] | None:
    """Train each config under rotating skew: losses, gradients, final weights and, under FSSDP, each step's
    metrics (what metrics.jsonl records). ``fixed_costs``: feed calibration :data:`SLOW_ROW_S` before every step."""
    results = []
    for cfg_dict, fixed in zip(cfg_dicts, fixed_costs, strict=True):
        cfg = config_from_dict(cfg_dict)
        parallel = (
            Parallel.from_world(layout_of(cfg, torch.distributed.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp)
            if distributed
            else Parallel.single()
        )
        trainer = Trainer(cfg, parallel=parallel)
        out = {"losses": [], "dropped": [], "grads": [], "metrics": []}
        for step in range(cfg.train.steps):
            for layer in trainer.model.moe_layers().values():
                layer.router.expert_bias.copy_(rotated_skew(step))
            if fixed and parallel.engine is not None:
                for _ in range(16):
                    parallel.engine.measurements.row_s.add(SLOW_ROW_S)
            losses = trainer.train_step(step)
            out["losses"].append(losses.loss)
            out["dropped"].append(losses.dropped)
            out["grads"].append(
                parallel.gather_full(trainer.model, {n: p.grad for n, p in trainer.model.named_parameters()})
            )
            if parallel.engine is not None:
                out["metrics"].append(parallel.step_metrics())
        out["params"] = parallel.gather_full(trainer.model, dict(trainer.model.named_parameters()))
        results.append(out)
    return results if not distributed or torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    cfg = small_config(small_data, tmp_path_factory.mktemp("ref"), COMMON, STEPS).to_dict()
    return train_rotating([cfg], False, [False])[0]


def test_auto_budgets_and_calibration_match_single_process(reference, small_data, tmp_path):
    names = list(CASES)
    cfgs = [small_config(small_data, tmp_path / n, COMMON + CASES[n], STEPS).to_dict() for n in names]
    fixed = [n.startswith("calibrate") for n in names]
    results = run_workers(train_rotating, 2, cfgs, True, fixed, timeout_s=600)[0]
    for name, got in zip(names, results):
        assert_matches(got, reference, f"{name} on 2 ranks", grad_rtol=GRAD_RTOL_LONG)
        layers = set(got["metrics"][0]["replicas"])
        for step, metrics in enumerate(got["metrics"]):
            assert set(metrics["overlap_budget"]) == set(metrics["memory_budget"]) == layers
            budgets = [(metrics["overlap_budget"][n], metrics["memory_budget"][n]) for n in sorted(layers)]
            assert all(isinstance(t, int) and isinstance(m, int) and t >= 0 and m >= 0 for t, m in budgets)
            if name.startswith("auto") and step == 0:
                assert all(t == 0 for t, _ in budgets), f"{name}: step 1 has no measurements, so t = 0 (plain EP)"
            if name == "auto-capped-rm":  # 1 MiB over 2 live layers x (weights + gradient), clipped to E - E/D
                assert all(m == CAPPED_M for _, m in budgets), budgets
            if name == "calibrate":
                assert budgets == [(4, 1)] * len(layers), "fixed budgets stay as configured"
        if name.startswith("calibrate"):
            corrected = sum(sum(m["calibrated"].values()) for m in got["metrics"])
            assert corrected > 0, f"{name}: calibration never corrected a plan under rotating skew"
        else:
            assert all("calibrated" not in m for m in got["metrics"])


MIB = 2**20


def agree_on_two_ranks() -> dict:
    """Each rank's own samples (layer 1 only on rank 1), then the group's agreement, on every rank."""
    transport = TorchTransport(None, CommStats())
    rank = transport.rank
    measured = Measurements()
    for _ in range(2):
        measured.add_layer()
    before = (measured.overlap_budget(0, 4 * MIB, 8), measured.memory_budget(0, 8 * MIB, 8, 2, 2))
    before += (measured.calibration_costs(),)
    for seconds in (0.010 + 0.005 * rank, 0.030):  # medians: 0.020 on rank 0, 0.0225 on rank 1
        measured.add_non_moe(0, seconds)
    if rank == 1:
        measured.add_non_moe(1, 0.007)
    measured.add_rows(100, 0.001 * (rank + 1))  # 1 and 2 ms forward over 100 rows
    measured.add_probe((1e9, 2e9)[rank], (5e9, 4e9)[rank])
    measured.agree(transport, torch.device("cpu"))
    return {
        "before": before,
        "non_moe": [m.value for m in measured.non_moe_s],
        "costs": measured.calibration_costs(),
        "free": measured.free_bytes.value,
        "t": measured.overlap_budget(0, 4 * MIB, 8),
        "m_capped": measured.memory_budget(40, 8 * MIB, 8, 2, 2),
        "m_free": measured.memory_budget(0, 8 * MIB, 256, 2, 2),
    }


def test_every_rank_agrees_on_the_cautious_side_of_the_measurements():
    rank0, rank1 = run_workers(agree_on_two_ranks, 2, timeout_s=120)
    assert rank0 == rank1, "every rank must derive the same budgets"
    assert rank0["before"] == (0, 0, None), "no measurement yet: t = m = 0 (plain EP), no calibration"
    assert rank0["non_moe"] == [pytest.approx(0.020), pytest.approx(0.007)]  # MIN of medians; a missing one: inf
    assert rank0["costs"] == (pytest.approx(3 * 0.001 / 100), 1e9)  # forward x (1 + backward's 2), slowest link
    assert rank0["free"] == 4e9
    assert rank0["t"] == 4  # floor(0.020 s x 1e9 B/s / 4 MiB) = floor(4.77)
    assert rank0["m_capped"] == 2  # 40 MiB / (8 MiB x 2 live layers)
    assert rank0["m_free"] == 119  # half of the least free memory: floor(2e9 B / (8 MiB x 2 live layers))
