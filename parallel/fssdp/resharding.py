"""Heterogeneous sharding: who owns which expert, layer by layer.

Every device owns exactly E/D experts in every layer, so the shapes of its expert parameters and optimizer
state never change; only *which* experts sit in those slots does. Expert parallelism puts contiguous blocks
on each device (:func:`initial_owners`), so when the same expert index is hot in many layers one device owns
all of them. :func:`reshard_owners` instead spreads the hot experts of all layers over the devices:

  layer by layer, hottest expert first (ties by index), each expert first goes to a node, then to a device
  of that node:
  - node: the least load accumulated over all layers assigned so far per device, among the nodes with a free
    slot in this layer; ties go to the node with more free slots in this layer, then to the lower index;
  - device: the least accumulated load among that node's devices with a free slot; ties to the lower index.
  Without ``devices_per_node`` all devices form one node, so only the device level remains.

This is the classic longest-processing-time greedy, run over the layers with a per-layer slot limit, node level
first: a node's share of hot experts decides how many tokens cross its network links, a device's share how long
it computes. The caller moves ownership (weights and optimizer state) along :func:`moves`.

Shapes: L layers, E experts, D devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from hecate.collectives.placement import OwnerPlacement
from hecate.parallel.errors import LayoutError
from hecate.parallel.fssdp.load import as_loads
from hecate.parallel.fssdp.planner import check_devices_per_node, hottest_experts, nodes_of


def _slots_per_device(num_experts: int, num_devices: int) -> int:
    if num_devices < 1:
        raise LayoutError(f"resharding needs at least 1 device, got {num_devices}")
    if num_experts < 1 or num_experts % num_devices:
        raise LayoutError(
            f"moe.num_experts={num_experts} must be a positive multiple of the {num_devices} devices "
            f"of the FSSDP group, so that every device owns the same number of experts"
        )
    return num_experts // num_devices


def initial_owners(num_experts: int, num_devices: int) -> OwnerPlacement:
    """Expert-parallel layout: contiguous blocks, expert e on device e // (E / D)."""
    slots = _slots_per_device(num_experts, num_devices)
    return OwnerPlacement(tuple(e // slots for e in range(num_experts)), num_devices)


def reshard_owners(
    loads_LE: Sequence[Sequence[float]], num_devices: int, devices_per_node: int | None = None
) -> list[OwnerPlacement]:
    """One owner placement per layer, by the rule in the module docstring."""
    check_devices_per_node(devices_per_node)
    if not loads_LE:
        return []
    num_experts = len(loads_LE[0])
    slots = _slots_per_device(num_experts, num_devices)
    nodes = nodes_of(num_devices, devices_per_node)
    acc_D = [0.0] * num_devices
    owners_L: list[OwnerPlacement] = []
    for layer, layer_load_E in enumerate(loads_LE):
        load_E = as_loads(layer_load_E, num_experts, f"reshard_owners layer {layer}")
        free_D = [slots] * num_devices
        owner_E = [-1] * num_experts
        for expert in hottest_experts(load_E, num_experts):
            room_N = [sum(free_D[d] for d in devices) for devices in nodes]
            node = min(
                (n for n in range(len(nodes)) if room_N[n] > 0),
                key=lambda n: (sum(acc_D[d] for d in nodes[n]) / len(nodes[n]), -room_N[n], n),
            )
            device = min((d for d in nodes[node] if free_D[d] > 0), key=lambda d: (acc_D[d], d))
            owner_E[expert] = device
            free_D[device] -= 1
            acc_D[device] += load_E[expert]
        owners_L.append(OwnerPlacement(tuple(owner_E), num_devices))
    return owners_L


def moves(old: OwnerPlacement, new: OwnerPlacement) -> list[tuple[int, int, int]]:
    """(expert, from_device, to_device) for every expert whose owner changes, in expert order."""
    if (old.num_chunks, old.world_size) != (new.num_chunks, new.world_size):
        raise LayoutError(
            f"cannot move ownership between {old.num_chunks} experts on {old.world_size} devices "
            f"and {new.num_chunks} experts on {new.world_size} devices"
        )
    return [(e, a, b) for e, (a, b) in enumerate(zip(old.owner_C, new.owner_C)) if a != b]
