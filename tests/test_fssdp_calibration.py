"""Calibration: the plan corrected with the router's real counts only when the saving beats the extra gather."""

import pytest

from hecate.collectives import MaterializedPlacement, OwnerPlacement
from hecate.parallel.fssdp import EpPolicy, FssdpPolicy, calibrate
from hecate.parallel.fssdp.calibration import new_copies_on_critical_path

FOUR = OwnerPlacement((0, 1, 2, 3), 4)
POLICY = FssdpPolicy(overlap_budget=2, memory_budget=1)
ESTIMATE_E = [90, 4, 3, 3]  # the plan expected expert 0 to be hot ...
COUNTS_E = [3, 3, 4, 90]  # ... the router sent the tokens to expert 3
EXPERT_BYTES, BANDWIDTH = 10**6, 1e9  # one extra copy on the critical path: 1 ms
# Planned ((0, 1, 2, 3), (0, 1), (2,), (3,)) leaves the 90 rows of expert 3 on device 3: max 90. The plan made from
# the counts, ((0,), (1,), (2, 3), (0, 1, 2, 3)), splits them: max 26 (see the planner's proportional test, mirrored).
# Its new copies: expert 3 to devices 0, 1, 2 and expert 2 to device 3; device 3 sends 3 of them: 3 ms.
SAVED_ROWS, NEW_COPIES = 90 - 26, 3


def planned() -> MaterializedPlacement:
    return POLICY.materialize(FOUR, ESTIMATE_E)


def test_the_candidate_and_its_cost_are_as_computed_by_hand():
    candidate = POLICY.materialize(FOUR, COUNTS_E)
    assert candidate.devices_C == ((0,), (1,), (2, 3), (0, 1, 2, 3))
    assert new_copies_on_critical_path(FOUR, planned(), candidate) == NEW_COPIES


def test_a_saving_larger_than_the_extra_gather_corrects_the_plan():
    result = calibrate(
        POLICY, FOUR, planned(), COUNTS_E, row_seconds=1e-4, expert_bytes=EXPERT_BYTES, gather_bytes_per_s=BANDWIDTH
    )
    assert result.corrected and result.placement == POLICY.materialize(FOUR, COUNTS_E)
    assert result.saving_s == pytest.approx(SAVED_ROWS * 1e-4)
    assert result.cost_s == pytest.approx(NEW_COPIES * EXPERT_BYTES / BANDWIDTH)


def test_a_saving_smaller_than_the_extra_gather_keeps_the_plan():
    result = calibrate(
        POLICY, FOUR, planned(), COUNTS_E, row_seconds=1e-6, expert_bytes=EXPERT_BYTES, gather_bytes_per_s=BANDWIDTH
    )
    assert not result.corrected and result.placement == planned()
    assert result.saving_s == pytest.approx(SAVED_ROWS * 1e-6) and result.saving_s < result.cost_s


def test_an_accurate_estimate_or_a_policy_without_replicas_keeps_the_plan():
    exact = calibrate(POLICY, FOUR, planned(), ESTIMATE_E, row_seconds=1.0, expert_bytes=1, gather_bytes_per_s=1e9)
    assert not exact.corrected and exact.saving_s == 0 and exact.cost_s == 0
    ep = EpPolicy().materialize(FOUR, ESTIMATE_E)
    assert (
        calibrate(EpPolicy(), FOUR, ep, COUNTS_E, row_seconds=1.0, expert_bytes=1, gather_bytes_per_s=1e9).placement
        == ep
    )


@pytest.mark.parametrize("row_seconds, expert_bytes, bandwidth", [(-1.0, 1, 1.0), (1.0, 0, 1.0), (1.0, 1, 0.0)])
def test_impossible_costs_are_rejected(row_seconds, expert_bytes, bandwidth):
    with pytest.raises(ValueError, match="calibration needs"):
        calibrate(
            POLICY,
            FOUR,
            planned(),
            COUNTS_E,
            row_seconds=row_seconds,
            expert_bytes=expert_bytes,
            gather_bytes_per_s=bandwidth,
        )
