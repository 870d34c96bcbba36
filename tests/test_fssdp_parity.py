"""FSSDP reproduces the single-process reference under every placement policy, with re-materialization on and
off, and with heterogeneous re-sharding inside the run: 10 steps on 2 and 4 simulated ranks, with skewed routing
(replicas really exist) and with natural routing. Losses and final weights to 1e-5; gradients of every step to
1e-4 (tests/parity.py says why)."""

from __future__ import annotations

import pytest
from parity import GRAD_RTOL_LONG, assert_matches, small_config, train

from hecate.launch.simulate import run_workers

pytestmark = pytest.mark.slow  # starts processes

STEPS = 10
EXPERTS = 8  # 4 per rank on 2 ranks, 2 per rank on 4
CASES = {  # name: (fssdp overrides, skewed routing)
    "ep": (["fssdp.policy=ep"], False),
    "ep-reshard": (["fssdp.policy=ep", "fssdp.reshard_every=3"], True),
    "ep-rm": (["fssdp.policy=ep", "fssdp.rematerialize=true"], False),  # no replicas: nothing to gather again
    "fsdp": (["fssdp.policy=fsdp"], True),
    "fsdp-rm": (["fssdp.policy=fsdp", "fssdp.rematerialize=true"], False),
    "shadow-rm": (["fssdp.policy=shadow", "fssdp.memory_budget=1", "fssdp.rematerialize=true"], True),
    "fssdp": (["fssdp.policy=fssdp"], True),
    "fssdp-proportional": (["fssdp.policy=fssdp", "fssdp.overlap_budget=4", "fssdp.memory_budget=1"], True),
    "fssdp-rm": (["fssdp.policy=fssdp", "fssdp.rematerialize=true"], True),
    "fssdp-reshard": (["fssdp.policy=fssdp", "fssdp.reshard_every=3"], True),
    "fssdp-nodes": (
        ["fssdp.policy=fssdp", "fssdp.devices_per_node=2", "fssdp.overlap_budget=4", "fssdp.memory_budget=1"],
        True,
    ),
    "fssdp-rm-reshard-natural": (["fssdp.policy=fssdp", "fssdp.rematerialize=true", "fssdp.reshard_every=4"], False),
}
COMMON = [f"moe.num_experts={EXPERTS}"]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """Single-process results, natural and skewed routing (FSSDP settings do not apply to one process)."""
    cfg = small_config(small_data, tmp_path_factory.mktemp("ref-natural"), COMMON, STEPS).to_dict()
    natural = train([cfg], distributed=False)[0]
    cfg = small_config(small_data, tmp_path_factory.mktemp("ref-skewed"), COMMON, STEPS).to_dict()
    return {False: natural, True: train([cfg], distributed=False, skew=True)[0]}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("skew", [False, True], ids=["natural", "skewed"])
def test_every_policy_matches_single_process(world, skew, reference, small_data, tmp_path):
    names = [name for name, (_, skewed) in CASES.items() if skewed == skew]
    cfgs = [small_config(small_data, tmp_path / name, COMMON + CASES[name][0], STEPS).to_dict() for name in names]
    results = run_workers(train, world, cfgs, True, skew, timeout_s=600)[0]
    for name, got in zip(names, results):
        assert_matches(got, reference[skew], f"{name} on {world} ranks", grad_rtol=GRAD_RTOL_LONG)
        if name.startswith(("fsdp", "shadow", "fssdp")) and skew:
            assert sum(got["replicas"]) > 0, f"{name}: no replicas were materialized"
        if name.startswith("fsdp"):
            assert got["replicas"] == [2 * EXPERTS * (world - 1)] * STEPS  # every expert everywhere, 2 layers
        if name.startswith("ep"):
            assert not any(got["replicas"])
