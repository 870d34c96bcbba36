"""The FSSDP planner: which extra expert replicas to materialize this step (the Hecate paper's Alg. 1).

Every rank calls :func:`plan_replicas` with the same owner placement and the same (global) load estimate, and
gets the same plan: the rule below is a pure function of its inputs, every sort has an index tie-break, and
floats are combined in the same order everywhere.

Budgets: t = overlap budget (copies that can arrive on a device while the block's attention runs), clipped to E;
m = memory budget (extra expert slots per device). The rule:

- balanced enough: when the owners alone give a predicted device load max / mean <= ``min_imbalance``
  (``fssdp.min_imbalance``; 1 = always plan), no replicas - a copy would cost a gather and a reduce-scatter for
  a gain smaller than that margin.
- hot experts: the t most loaded experts with load > 0 (ties by index). Only they are ever replicated.
- t <= m: every hot expert is copied to every device. A device receives at most t <= m copies.
- t > m: the D x m slots go to the hot experts, in proportion to their load:
  1. copies: the D x m slots are apportioned to the hot experts by load (largest remainder, ties by index),
     at most D - 1 copies each (one per device that does not own it); what a capped expert cannot take is
     apportioned again over the others.
  2. assigned tokens: each of an expert's holders (owner and copies) is assigned an even share
     load / holders of its tokens; a device starts with the shares of the experts it owns.
  3. nodes (``devices_per_node``; without it all devices form one node): hottest expert first, each copy goes
     to the node holding the fewest copies of that expert (so copies spread across nodes and tokens find one on
     their own node), then with the fewest assigned tokens per device, then the most free slots, then the lower
     index - among nodes that still have a device able to take it.
  4. devices: within each node, hottest expert first, each copy goes to the device with the fewest assigned
     tokens, then the most free slots, then the lower index, among the node's devices with a free slot that do
     not hold the expert yet. A copy that fits on none of them is dropped.
  5. guard: while the predicted maximum device load exceeds expert parallelism's, the last placed copy is
     removed - a plan never predicts a slower straggler than no replicas at all.

Predicted device load (:func:`predicted_device_load`) is the dispatcher's split (``parallel/moe/assignment.py``)
in real numbers: experts with one holder put their load on it; then replicated experts, hottest first, are
water-filled over their holders, raising the lowest first. With t <= m that never exceeds expert parallelism's
maximum (every device is a holder, so the fill stays under the mean); with t > m the guard ensures it.

Shapes: E experts, D devices, N nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from hecate.collectives.errors import ConfigError
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.collectives.plan import check_placements
from hecate.parallel.errors import LayoutError
from hecate.parallel.fssdp.load import as_loads

# Relative slack when comparing a plan's predicted maximum with expert parallelism's: the water-fill sums floats
# in another order than the owners' totals, so equal loads may differ in the last bits.
FLOAT_SLACK = 1e-12


def check_budget(field: str, value: int, also: str = "") -> None:
    """Budgets count expert copies: whole numbers >= 0 (``also`` names what else the caller accepts)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ConfigError(field, f"must be an integer >= 0 (expert copies per device){also}, got {value!r}")


def check_devices_per_node(devices_per_node: int | None) -> None:
    if devices_per_node is not None and (
        isinstance(devices_per_node, bool) or not isinstance(devices_per_node, Integral) or devices_per_node < 1
    ):
        raise ConfigError("fssdp.devices_per_node", f"must be an integer >= 1 or None, got {devices_per_node!r}")


def hottest_experts(load_E: Sequence[float], count: int) -> list[int]:
    """The ``count`` most loaded experts, hottest first; equal loads in index order."""
    return sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[: max(count, 0)]


def nodes_of(num_devices: int, devices_per_node: int | None) -> list[list[int]]:
    """Devices grouped by node, in index order (one node when ``devices_per_node`` is None)."""
    per_node = devices_per_node or num_devices
    return [list(range(first, min(first + per_node, num_devices))) for first in range(0, num_devices, per_node)]


def _water_fill(total: float, level_H: list[float]) -> list[float]:
    """Shares of ``total`` that raise the lowest levels first until they are level (ties: lower position)."""
    order = sorted(range(len(level_H)), key=lambda h: (level_H[h], h))
    filled, low_sum = len(order), 0.0
    for n, h in enumerate(order, start=1):
        low_sum += level_H[h]
        if n == len(order) or (total + low_sum) / n <= level_H[order[n]]:
            filled = n
            break
    target = (total + low_sum) / filled
    share_H = [0.0] * len(level_H)
    for h in order[:filled]:
        share_H[h] = max(target - level_H[h], 0.0)
    return share_H


def predicted_device_load(materialized: MaterializedPlacement, load_E: Sequence[float]) -> list[float]:
    """Tokens per device as the dispatcher splits them: single-holder experts on their holder, then replicated
    experts hottest first (ties by index) water-filled over their holders."""
    load_E = as_loads(load_E, materialized.num_chunks, "predicted_device_load")
    load_D = [0.0] * materialized.world_size
    replicated = []
    for expert, holders in enumerate(materialized.devices_C):
        if len(holders) == 1:
            load_D[holders[0]] += load_E[expert]
        elif holders:
            replicated.append(expert)
    for expert in sorted(replicated, key=lambda e: (-load_E[e], e)):
        holders = materialized.devices_C[expert]
        for device, share in zip(holders, _water_fill(load_E[expert], [load_D[d] for d in holders])):
            load_D[device] += share
    return load_D


def check_materialized(owner: OwnerPlacement, materialized: MaterializedPlacement, memory_budget: int) -> None:
    """Raise unless ``materialized`` is a placement the sparse collectives accept for ``owner`` (same world and
    experts, every owner kept: :func:`~hecate.collectives.plan.check_placements`) that adds at most
    ``memory_budget`` replicas to any device (what the engine's memory relies on)."""
    check_placements(owner, materialized)
    extra_D = [0] * owner.world_size
    for expert, holders in enumerate(materialized.devices_C):
        for device in holders:
            if device != owner.owner_C[expert]:
                extra_D[device] += 1
    over = {d: n for d, n in enumerate(extra_D) if n > memory_budget}
    if over:
        raise LayoutError(
            f"materialized placement exceeds fssdp.memory_budget={memory_budget} extra experts per "
            f"device: {{device: replicas}} = {over}"
        )


def apportion(slots: int, weight_X: Sequence[float], cap_X: Sequence[int]) -> list[int]:
    """``slots`` split in proportion to ``weight_X`` (largest remainder, ties by position), at most ``cap_X``
    each; what a capped item cannot take goes to the others in the same way. Weights must be > 0."""
    count_X = [0] * len(weight_X)
    open_X = [x for x in range(len(weight_X)) if cap_X[x] > 0]
    left = min(slots, sum(cap_X))
    while left > 0 and open_X:
        total = sum(weight_X[x] for x in open_X)
        quota_X = {x: left * weight_X[x] / total for x in open_X}
        grant_X = {x: min(int(quota_X[x]), cap_X[x] - count_X[x]) for x in open_X}
        spare = left - sum(grant_X.values())
        for x in sorted(open_X, key=lambda x: (-(quota_X[x] - int(quota_X[x])), x)):
            if spare == 0:
                break
            if grant_X[x] < cap_X[x] - count_X[x]:
                grant_X[x] += 1
                spare -= 1
        for x, grant in grant_X.items():
            count_X[x] += grant
            left -= grant
        open_X = [x for x in open_X if count_X[x] < cap_X[x]]
    return count_X


class _Placement:
    """The t > m branch's state: holders and assigned tokens per device, free slots; steps 2-4 of the rule."""

    def __init__(
        self,
        owner: OwnerPlacement,
        load_E: list[float],
        copies_E: dict[int, int],
        memory_budget: int,
        devices_per_node: int | None,
    ):
        self.owner, self.load_E, self.copies_E = owner, load_E, copies_E
        self.nodes = nodes_of(owner.world_size, devices_per_node)
        self.share_E = [load_E[e] / (1 + copies_E.get(e, 0)) for e in range(owner.num_chunks)]
        self.tokens_D = [0.0] * owner.world_size
        for expert, device in enumerate(owner.owner_C):
            self.tokens_D[device] += self.share_E[expert]
        self.free_D = [memory_budget] * owner.world_size
        self.holders_E = [{d} for d in owner.owner_C]
        self.replicas: list[tuple[int, int]] = []

    def copies_per_node(self) -> dict[int, list[int]]:
        """Step 3: how many copies of each hot expert each node gets."""
        nodes = self.nodes
        tokens_N = [sum(self.tokens_D[d] for d in devices) for devices in nodes]
        room_N = [sum(self.free_D[d] for d in devices) for devices in nodes]
        per_node_E: dict[int, list[int]] = {}
        for expert in sorted(self.copies_E, key=lambda e: (-self.load_E[e], e)):
            held_N = [sum(d in self.holders_E[expert] for d in devices) for devices in nodes]
            count_N = [0] * len(nodes)
            for _ in range(self.copies_E[expert]):
                able = [n for n in range(len(nodes)) if room_N[n] > 0 and held_N[n] < len(nodes[n])]
                if not able:
                    break
                node = min(able, key=lambda n: (held_N[n], tokens_N[n] / len(nodes[n]), -room_N[n], n))
                count_N[node] += 1
                held_N[node] += 1
                room_N[node] -= 1
                tokens_N[node] += self.share_E[expert]
            per_node_E[expert] = count_N
        return per_node_E

    def place_on_devices(self, per_node_E: dict[int, list[int]]) -> None:
        """Step 4: each node's copies onto its devices."""
        for node, devices in enumerate(self.nodes):
            for expert in sorted(per_node_E, key=lambda e: (-self.load_E[e], e)):
                for _ in range(per_node_E[expert][node]):
                    able = [d for d in devices if self.free_D[d] > 0 and d not in self.holders_E[expert]]
                    if not able:
                        break
                    device = min(able, key=lambda d: (self.tokens_D[d], -self.free_D[d], d))
                    self.holders_E[expert].add(device)
                    self.free_D[device] -= 1
                    self.tokens_D[device] += self.share_E[expert]
                    self.replicas.append((expert, device))


def _proportional_replicas(
    owner: OwnerPlacement, load_E: list[float], hot: list[int], memory_budget: int, devices_per_node: int | None
) -> list[tuple[int, int]]:
    """The t > m branch of the rule in the module docstring."""
    slots = owner.world_size * memory_budget
    copies = apportion(slots, [load_E[e] for e in hot], [owner.world_size - 1] * len(hot))
    copies_E = {e: c for e, c in zip(hot, copies) if c > 0}
    placement = _Placement(owner, load_E, copies_E, memory_budget, devices_per_node)
    placement.place_on_devices(placement.copies_per_node())
    replicas = placement.replicas
    ep_max = max(predicted_device_load(MaterializedPlacement.from_owner(owner), load_E))
    while replicas and max(
        predicted_device_load(MaterializedPlacement.from_owner(owner, replicas), load_E)
    ) > ep_max * (1 + FLOAT_SLACK):
        replicas = replicas[:-1]  # step 5: the guard
    return replicas


def plan_replicas(
    owner: OwnerPlacement,
    load_E: Sequence[float],
    overlap_budget: int,
    memory_budget: int,
    devices_per_node: int | None = None,
    min_imbalance: float = 1.0,
) -> MaterializedPlacement:
    """The owner placement plus this step's replicas, by the rule in the module docstring. The budgets and
    ``devices_per_node`` are checked where they enter (the config, :class:`~.policies.FssdpPolicy`)."""
    load_E = as_loads(load_E, owner.num_chunks, "plan_replicas load_E")
    owners_only = MaterializedPlacement.from_owner(owner)
    load_D = predicted_device_load(owners_only, load_E)
    if min_imbalance > 1 and sum(load_D) > 0 and max(load_D) * len(load_D) <= min_imbalance * sum(load_D):
        return owners_only
    overlap_budget, memory_budget = min(int(overlap_budget), owner.num_chunks), int(memory_budget)
    hot = [e for e in hottest_experts(load_E, overlap_budget) if load_E[e] > 0]
    if not hot or owner.world_size == 1 or memory_budget == 0:
        return owners_only
    if overlap_budget <= memory_budget:
        replicas = [(e, d) for e in hot for d in range(owner.world_size) if d != owner.owner_C[e]]
    else:
        replicas = _proportional_replicas(owner, load_E, hot, memory_budget, devices_per_node)
    materialized = MaterializedPlacement.from_owner(owner, replicas)
    check_materialized(owner, materialized, memory_budget)
    return materialized
