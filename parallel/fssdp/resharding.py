"""Heterogeneous sharding: who owns which expert, layer by layer (DESIGN.md section 2, last step).

Every device owns exactly E/D experts in every layer, so the shapes of its expert parameters and optimizer
state never change; only *which* experts sit in those slots does. Expert parallelism puts contiguous blocks
on each device (:func:`initial_owners`), so when the same expert index is hot in many layers one device owns
all of them. :func:`reshard_owners` instead spreads the hot experts of all layers over the devices:

  layer by layer, hottest expert first (ties by index), each expert goes to the device with the least load
  accumulated over all layers assigned so far, among the devices with a free slot in this layer; ties go to
  the device whose node has the least accumulated load (when ``devices_per_node`` is given), then to the
  lower index.

This is the classic longest-processing-time greedy, run over the layers with a per-layer slot limit. The
caller moves ownership (weights and optimizer state) along :func:`moves`.

Shapes: L layers, E experts, D devices.
"""
from __future__ import annotations

from collections.abc import Sequence

from hecate.collectives.errors import LayoutError
from hecate.collectives.placement import OwnerPlacement
from hecate.parallel.fssdp.load import as_loads
from hecate.parallel.fssdp.planner import check_devices_per_node, hottest_experts


def _slots_per_device(num_experts: int, num_devices: int) -> int:
    if num_devices < 1:
        raise LayoutError(f"resharding needs at least 1 device, got {num_devices}")
    if num_experts < 1 or num_experts % num_devices:
        raise LayoutError(f"moe.num_experts={num_experts} must be a positive multiple of the {num_devices} devices "
                          f"of the FSSDP group, so that every device owns the same number of experts")
    return num_experts // num_devices


def initial_owners(num_experts: int, num_devices: int) -> OwnerPlacement:
    """Expert-parallel layout: contiguous blocks, expert e on device e // (E / D)."""
    slots = _slots_per_device(num_experts, num_devices)
    return OwnerPlacement(tuple(e // slots for e in range(num_experts)), num_devices)


def reshard_owners(loads_LE: Sequence[Sequence[float]], num_devices: int,
                   devices_per_node: int | None = None) -> list[OwnerPlacement]:
    """One owner placement per layer, by the rule in the module docstring."""
    check_devices_per_node(devices_per_node)
    if not loads_LE:
        return []
    num_experts = len(loads_LE[0])
    slots = _slots_per_device(num_experts, num_devices)
    acc_D = [0.0] * num_devices

    def node(device: int) -> int:
        return 0 if devices_per_node is None else device // devices_per_node

    owners_L: list[OwnerPlacement] = []
    for layer, layer_load_E in enumerate(loads_LE):
        load_E = as_loads(layer_load_E, num_experts, f"reshard_owners layer {layer}")
        free_D = [slots] * num_devices
        owner_E = [-1] * num_experts
        for expert in hottest_experts(load_E, num_experts):
            node_acc: dict[int, float] = {}
            for d in range(num_devices):
                node_acc[node(d)] = node_acc.get(node(d), 0.0) + acc_D[d]
            device = min((d for d in range(num_devices) if free_D[d] > 0),
                         key=lambda d: (acc_D[d], node_acc[node(d)], d))
            owner_E[expert] = device
            free_D[device] -= 1
            acc_D[device] += load_E[expert]
        owners_L.append(OwnerPlacement(tuple(owner_E), num_devices))
    return owners_L


def moves(old: OwnerPlacement, new: OwnerPlacement) -> list[tuple[int, int, int]]:
    """(expert, from_device, to_device) for every expert whose owner changes, in expert order."""
    if (old.num_chunks, old.world_size) != (new.num_chunks, new.world_size):
        raise LayoutError(f"cannot move ownership between {old.num_chunks} experts on {old.world_size} devices "
                          f"and {new.num_chunks} experts on {new.world_size} devices")
    return [(e, a, b) for e, (a, b) in enumerate(zip(old.owner_C, new.owner_C)) if a != b]
