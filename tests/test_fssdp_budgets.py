"""Budgets derived from measurements (fssdp.overlap_budget / memory_budget = auto) and the config that allows them."""

import pytest

from hecate.collectives.errors import ConfigError
from hecate.parallel.config import FssdpConfig
from hecate.parallel.fssdp import RecentMedian, memory_budget, overlap_budget, replica_bytes
from hecate.trainer.config import load_config

MIB = 2**20


def test_overlap_budget_is_the_copies_that_arrive_during_the_non_moe_time():
    # 2 ms at 10 GB/s moves 20 MB: 4 experts of 4.5 MiB (18.9 MB), not 5 (23.6 MB)
    assert overlap_budget(2e-3, 10e9, int(4.5 * MIB), num_experts=64) == 4
    assert overlap_budget(2e-3, 10e9, 4 * MIB, num_experts=64) == 4  # 20 MB / 4.19 MB = 4.77
    assert overlap_budget(0.0, 10e9, MIB, num_experts=8) == 0
    assert overlap_budget(1.0, 10e9, MIB, num_experts=8) == 8  # clipped to E


def test_memory_budget_counts_weights_and_gradients_of_every_live_layer():
    per_replica = replica_bytes(expert_params=MIB, param_bytes=2, grad_bytes=4)  # bf16 weights, fp32 gradients
    assert per_replica == 6 * MIB
    assert replica_bytes(MIB, 4) == 8 * MIB  # gradients in the weights' dtype by default
    assert memory_budget(100 * MIB, per_replica, num_experts=64, num_devices=8) == 16  # floor(100 / 6)
    assert memory_budget(100 * MIB, per_replica, num_experts=64, num_devices=8, layers_alive=4) == 4  # 100 / 24
    assert memory_budget(10**15, per_replica, num_experts=64, num_devices=8) == 56  # clipped to E - E/D
    assert memory_budget(5 * MIB, per_replica, num_experts=64, num_devices=8) == 0


@pytest.mark.parametrize("args", [(-1.0, 1e9, MIB, 8), (1e-3, float("nan"), MIB, 8), (1e-3, 1e9, 0, 8)])
def test_overlap_budget_rejects_impossible_measurements(args):
    with pytest.raises(ValueError, match="must be a finite number"):
        overlap_budget(*args)


def test_recent_median_ignores_an_odd_slow_step_and_follows_a_lasting_change():
    median = RecentMedian(window=3)
    assert median.value is None and median.count == 0
    for sample in (1.0, 9.0, 1.2):  # the 9 s step (warm-up, say) does not move the median
        median.add(sample)
    assert median.value == 1.2
    for sample in (2.0, 2.0):
        median.add(sample)
    assert median.value == 2.0 and median.count == 3
    with pytest.raises(ValueError, match="window"):
        RecentMedian(window=0)


@pytest.mark.parametrize("field", ["overlap_budget", "memory_budget"])
def test_config_accepts_auto_or_a_whole_number(field):
    assert getattr(load_config(overrides=[f"fssdp.{field}=auto"]).fssdp, field) == "auto"
    assert getattr(load_config(overrides=[f"fssdp.{field}=3"]).fssdp, field) == 3
    for bad in ("-1", "fast"):
        with pytest.raises(ConfigError) as error:
            load_config(overrides=[f"fssdp.{field}={bad}"])
        assert error.value.field == f"fssdp.{field}"
        assert "integer >= 0" in str(error.value) and "or 'auto'" in str(error.value)
    assert FssdpConfig().overlap_budget == 2 and FssdpConfig().memory_budget == 2  # defaults unchanged
