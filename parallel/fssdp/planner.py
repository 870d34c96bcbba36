"""The FSSDP planner: which extra expert replicas to materialize this step (DESIGN.md section 2).

Every rank calls :func:`plan_replicas` with the same owner placement and the same (global) load estimate, and
gets the same plan: the rule below is a pure function of its inputs, every sort has an index tie-break, and
floats are combined in the same order everywhere.

The rule, with t = overlap budget (copies that can arrive on a device while attention runs) and m = memory
budget (extra expert slots per device); t is clipped to E:

- balanced enough: when the owners alone already give a predicted device load max / mean <= ``min_imbalance``
  (``fssdp.min_imbalance``; 1 = always plan), no replicas - a copy would cost a gather and a reduce-scatter for
  a gain smaller than that margin.

- t <= m: the t hottest experts (load > 0) are replicated to every device. Each device receives at most t.
- t > m: replicas follow load, in two greedy phases that share one copy step. The copy step puts one more
  copy of expert e on the device with the least predicted load among those with a free slot (fewer than m
  replicas so far) that do not hold e yet; ties go to a device on e's owner's node (when ``devices_per_node``
  is given), then to the lower index. The copy is made only if it helps: load_e > 0 and the receiving
  device's predicted load after it must not exceed that of e's busiest holder before it (otherwise no
  candidate helps: they are all at least as loaded). So a copy never raises the predicted (even-split)
  maximum, and it strictly lowers the maximum the dispatcher reaches, since that one splits unevenly.
  1. Proportional: experts hottest first (ties by index); expert e gets copy steps until it has
     ``copies_e = clamp(round_half_up(load_e / (total / D)), 1, D)`` copies (its owner's included), i.e. one
     per device-worth of tokens, or until a step fails.
  2. Straggler relief, with the slots left: take the device with the highest predicted load (ties: lower
     index) and try a copy step for the experts it holds, largest per-copy share first (ties by index); repeat
     until no expert of the straggler can be copied. This catches a device that owns several warm experts
     none of which is worth a device on its own (e.g. experts 0 and 1 of a Zipf load under expert parallelism).
  Each device receives at most m < t copies, and the predicted maximum never rises above expert parallelism's.

Predicted load of a device = sum over the experts it holds of load_e / (number of holders of e): the even split.
The dispatcher balances better than that (it splits unevenly), so this is a planning model, not a promise.

Shapes: E experts, D devices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

from hecate.collectives.errors import ConfigError, LayoutError
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.parallel.fssdp.load import as_loads


def check_budget(field: str, value: int) -> None:
    """Budgets count expert copies: whole numbers >= 0."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ConfigError(field, f"must be an integer >= 0 (expert copies per device), got {value!r}")


def check_devices_per_node(devices_per_node: int | None) -> None:
    if devices_per_node is not None and (isinstance(devices_per_node, bool)
                                         or not isinstance(devices_per_node, Integral) or devices_per_node < 1):
        raise ConfigError("fssdp.devices_per_node", f"must be an integer >= 1 or None, got {devices_per_node!r}")


def hottest_experts(load_E: Sequence[float], count: int) -> list[int]:
    """The ``count`` most loaded experts, hottest first; equal loads in index order."""
    return sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[:max(count, 0)]


def predicted_device_load(materialized: MaterializedPlacement, load_E: Sequence[float]) -> list[float]:
    """Tokens per device if each expert's load is split evenly over the devices holding it."""
    load_E = as_loads(load_E, materialized.num_chunks, "predicted_device_load")
    load_D = [0.0] * materialized.world_size
    for expert, holders in enumerate(materialized.devices_C):
        for device in holders:
            load_D[device] += load_E[expert] / len(holders)
    return load_D


def check_materialized(owner: OwnerPlacement, materialized: MaterializedPlacement, memory_budget: int) -> None:
    """Raise LayoutError unless ``materialized`` contains ``owner`` and adds at most ``memory_budget``
    replicas to any device (the invariants SparseAllGather and the engine's buffers rely on)."""
    if (materialized.num_chunks, materialized.world_size) != (owner.num_chunks, owner.world_size):
        raise LayoutError(f"materialized placement has {materialized.num_chunks} experts on "
                          f"{materialized.world_size} devices, the owner placement {owner.num_chunks} on "
                          f"{owner.world_size}")
    missing = [(e, d) for e, d in enumerate(owner.owner_C) if d not in materialized.devices_C[e]]
    if missing:
        raise LayoutError(f"materialized placement drops owners (expert, device): {missing}; it must contain "
                          f"the owner placement")
    extra_D = [0] * owner.world_size
    for expert, holders in enumerate(materialized.devices_C):
        for device in holders:
            if device != owner.owner_C[expert]:
                extra_D[device] += 1
    over = {d: n for d, n in enumerate(extra_D) if n > memory_budget}
    if over:
        raise LayoutError(f"materialized placement exceeds fssdp.memory_budget={memory_budget} extra experts per "
                          f"device: {{device: replicas}} = {over}")


def _replicate_everywhere(owner: OwnerPlacement, experts: Sequence[int]) -> list[tuple[int, int]]:
    return [(e, d) for e in experts for d in range(owner.world_size) if d != owner.owner_C[e]]


class _Greedy:
    """State of the t > m branch: holders and predicted load per device, free slots; one copy at a time."""

    def __init__(self, owner: OwnerPlacement, load_E: list[float], memory_budget: int,
                 devices_per_node: int | None):
        self.owner, self.load_E, self.devices_per_node = owner, load_E, devices_per_node
        self.holders_E = [[d] for d in owner.owner_C]
        self.pred_D = [0.0] * owner.world_size
        for expert, device in enumerate(owner.owner_C):
            self.pred_D[device] += load_E[expert]
        self.free_D = [memory_budget] * owner.world_size
        self.replicas: list[tuple[int, int]] = []

    def node(self, device: int) -> int:
        return 0 if self.devices_per_node is None else device // self.devices_per_node

    def try_copy(self, expert: int) -> bool:
        """Copy ``expert`` to the least loaded eligible device unless that would only move its busiest holder's
        load elsewhere; True if the copy was made."""
        holders = self.holders_E[expert]
        candidates = [d for d in range(self.owner.world_size) if self.free_D[d] > 0 and d not in holders]
        if not candidates:
            return False
        home = self.node(self.owner.owner_C[expert])
        target = min(candidates, key=lambda d: (self.pred_D[d], self.node(d) != home, d))
        load, copies = self.load_E[expert], len(holders)
        share_after = load / (copies + 1)
        if load <= 0 or self.pred_D[target] + share_after > max(self.pred_D[h] for h in holders):
            return False  # the copy would only move the bottleneck, not lower it
        for holder in holders:
            self.pred_D[holder] -= load / copies - share_after
        self.pred_D[target] += share_after
        holders.append(target)
        self.free_D[target] -= 1
        self.replicas.append((expert, target))
        return True

    def proportional(self) -> None:
        """Phase 1: hottest first, each expert up to its device-worths of load in copies."""
        per_device = sum(self.load_E) / self.owner.world_size
        for expert in hottest_experts(self.load_E, len(self.load_E)):
            wanted = min(max(math.floor(self.load_E[expert] / per_device + 0.5), 1), self.owner.world_size)
            while len(self.holders_E[expert]) < wanted and self.try_copy(expert):
                pass

    def relieve_straggler(self) -> None:
        """Phase 2: while slots help, copy an expert of the most loaded device (largest share first)."""
        while True:
            straggler = min(range(self.owner.world_size), key=lambda d: (-self.pred_D[d], d))
            held = [e for e, holders in enumerate(self.holders_E) if straggler in holders]
            held.sort(key=lambda e: (-self.load_E[e] / len(self.holders_E[e]), e))
            if not any(self.try_copy(expert) for expert in held):  # any() stops at the first copy made
                return


def _load_following_replicas(owner: OwnerPlacement, load_E: list[float], memory_budget: int,
                           devices_per_node: int | None) -> list[tuple[int, int]]:
    """The t > m branch of the rule in the module docstring."""
    if sum(load_E) <= 0 or owner.world_size == 1 or memory_budget == 0:
        return []
    greedy = _Greedy(owner, load_E, memory_budget, devices_per_node)
    greedy.proportional()
    greedy.relieve_straggler()
    return greedy.replicas


def plan_replicas(owner: OwnerPlacement, load_E: Sequence[float], overlap_budget: int, memory_budget: int,
                  devices_per_node: int | None = None, min_imbalance: float = 1.0) -> MaterializedPlacement:
    """The owner placement plus this step's replicas, by the rule in the module docstring."""
    check_budget("fssdp.overlap_budget", overlap_budget)
    check_budget("fssdp.memory_budget", memory_budget)
    check_devices_per_node(devices_per_node)
    load_E = as_loads(load_E, owner.num_chunks, "plan_replicas load_E")
    owners_only = MaterializedPlacement.from_owner(owner)
    load_D = predicted_device_load(owners_only, load_E)
    if min_imbalance > 1 and sum(load_D) > 0 and max(load_D) * len(load_D) <= min_imbalance * sum(load_D):
        return owners_only
    overlap_budget, memory_budget = min(int(overlap_budget), owner.num_chunks), int(memory_budget)
    if overlap_budget <= memory_budget:
        hot = [e for e in hottest_experts(load_E, overlap_budget) if load_E[e] > 0]
        replicas = _replicate_everywhere(owner, hot)
    else:
        replicas = _load_following_replicas(owner, load_E, memory_budget, devices_per_node)
    materialized = MaterializedPlacement.from_owner(owner, replicas)
    check_materialized(owner, materialized, memory_budget)
    return materialized
