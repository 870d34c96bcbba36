"""Calibration: correct this step's plan once the router has counted the real tokens, when it pays.

The plan was made before the router ran, from the load estimate, and its gather travelled under attention. After
the gate the real per-expert counts are known; the plan the policy would make from them may level the devices
better, but its new copies need a second gather that nothing hides (it sits on the critical path). So:

    candidate = policy.materialize(owner, counts_E)
    saving    = (max predicted rows of the plan - max predicted rows of the candidate) x seconds per row
    cost      = (most new copies one device receives or sends) x expert bytes / gather bytes per second
    corrected = candidate if saving > cost else the plan

Both maxima are the dispatcher's split of the real counts (:func:`predicted_device_load`). Copies the plan has
and the candidate does not cost nothing (the dispatcher leaves them idle). Pure: every rank computes the same
answer from the same all-reduced counts.

Shapes: E experts, D devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.parallel.fssdp.load import as_loads
from hecate.parallel.fssdp.planner import predicted_device_load
from hecate.parallel.fssdp.policies import Policy


@dataclass(frozen=True)
class Calibration:
    """The placement to run and why: predicted seconds saved and the extra gather's seconds."""

    placement: MaterializedPlacement
    corrected: bool
    saving_s: float
    cost_s: float


def new_copies_on_critical_path(
    owner: OwnerPlacement, planned: MaterializedPlacement, candidate: MaterializedPlacement
) -> int:
    """Copies in ``candidate`` but not in ``planned``, counted on the busiest endpoint: the most one device
    receives, or the most one owner sends."""
    received_D, sent_D = [0] * owner.world_size, [0] * owner.world_size
    for expert, holders in enumerate(candidate.devices_C):
        for device in set(holders) - set(planned.devices_C[expert]):
            received_D[device] += 1
            sent_D[owner.owner_C[expert]] += 1
    return max(received_D + sent_D)


def calibrate(
    policy: Policy,
    owner: OwnerPlacement,
    planned: MaterializedPlacement,
    counts_E: torch.Tensor | Sequence[float],
    *,
    row_seconds: float,
    expert_bytes: int,
    gather_bytes_per_s: float,
) -> Calibration:
    """This step's placement given its real per-expert counts (summed over the group), by the rule above.

    ``row_seconds``: one (token, expert) row's expert compute (forward and backward); ``expert_bytes``: one
    expert's chunk; ``gather_bytes_per_s``: the measured SparseAllGather bandwidth of one device."""
    if row_seconds < 0 or expert_bytes <= 0 or not gather_bytes_per_s > 0:
        raise ValueError(
            f"calibration needs row_seconds >= 0, expert_bytes > 0 and gather_bytes_per_s > 0, got "
            f"{row_seconds}, {expert_bytes}, {gather_bytes_per_s}"
        )
    counts_E = as_loads(counts_E, owner.num_chunks, "calibration counts_E")
    candidate = policy.materialize(owner, counts_E)
    saving = (
        max(predicted_device_load(planned, counts_E)) - max(predicted_device_load(candidate, counts_E))
    ) * row_seconds
    cost = new_copies_on_critical_path(owner, planned, candidate) * expert_bytes / gather_bytes_per_s
    if candidate != planned and saving > cost:
        return Calibration(candidate, True, saving, cost)
    return Calibration(planned, False, saving, cost)
