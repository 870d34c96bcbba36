"""Materialization policies as data: each one turns (owner placement, load estimate) into this step's
materialized placement, so the engine runs ``ep``, ``fsdp``, ``shadow`` and ``fssdp`` on one code path and
never branches on the policy's name.

Shapes: E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from hecate.collectives.errors import ConfigError
from hecate.collectives.placement import MaterializedPlacement, OwnerPlacement
from hecate.parallel.fssdp.load import as_loads
from hecate.parallel.fssdp.planner import check_budget, check_devices_per_node, hottest_experts, plan_replicas


@runtime_checkable
class Policy(Protocol):
    """Decides the replicas of one step. Must be a pure function of its inputs: every rank calls it."""

    name: str

    def materialize(self, owner: OwnerPlacement, load_E: Sequence[float]) -> MaterializedPlacement: ...


@dataclass(frozen=True)
class EpPolicy:
    """Expert parallelism: no replicas, tokens travel to the owner (P' = P)."""

    name: ClassVar[str] = "ep"

    def materialize(self, owner: OwnerPlacement, load_E: Sequence[float]) -> MaterializedPlacement:
        return MaterializedPlacement.from_owner(owner)


@dataclass(frozen=True)
class FsdpPolicy:
    """ZeRO-3 / FSDP applied to experts: every expert gathered on every device."""

    name: ClassVar[str] = "fsdp"

    def materialize(self, owner: OwnerPlacement, load_E: Sequence[float]) -> MaterializedPlacement:
        every_device = tuple(range(owner.world_size))
        return MaterializedPlacement((every_device,) * owner.num_chunks, owner.world_size)


@dataclass(frozen=True)
class ShadowPolicy:
    """FasterMoE-style shadowing: the ``num_hot`` hottest experts (clipped to E) broadcast to all devices.
    ``num_hot`` comes from ``fssdp.memory_budget`` (each device then holds at most that many extra experts)."""

    num_hot: int
    name: ClassVar[str] = "shadow"

    def __post_init__(self) -> None:
        check_budget("fssdp.memory_budget", self.num_hot)

    def materialize(self, owner: OwnerPlacement, load_E: Sequence[float]) -> MaterializedPlacement:
        load_E = as_loads(load_E, owner.num_chunks, "shadow policy load_E")
        hot = hottest_experts(load_E, self.num_hot)
        return MaterializedPlacement.from_owner(
            owner, [(e, d) for e in hot for d in range(owner.world_size) if d != owner.owner_C[e]]
        )


@dataclass(frozen=True)
class FssdpPolicy:
    """Hecate's sparse materialization: :func:`plan_replicas` under the overlap and memory budgets."""

    overlap_budget: int
    memory_budget: int
    devices_per_node: int | None = None
    min_imbalance: float = 1.0  # no replicas while the owners' predicted max / mean load is at most this
    name: ClassVar[str] = "fssdp"

    def __post_init__(self) -> None:  # fail at build time, not at the first step
        check_budget("fssdp.overlap_budget", self.overlap_budget)
        check_budget("fssdp.memory_budget", self.memory_budget)
        check_devices_per_node(self.devices_per_node)
        if not self.min_imbalance >= 1:  # NaN fails too
            raise ConfigError(
                "fssdp.min_imbalance", f"must be >= 1 (a max / mean load ratio), got {self.min_imbalance}"
            )

    def materialize(self, owner: OwnerPlacement, load_E: Sequence[float]) -> MaterializedPlacement:
        return plan_replicas(
            owner, load_E, self.overlap_budget, self.memory_budget, self.devices_per_node, self.min_imbalance
        )


_BUILDERS: dict[str, Callable[[int, int, int | None, float], Policy]] = {
    "ep": lambda overlap, memory, per_node, balanced: EpPolicy(),
    "fsdp": lambda overlap, memory, per_node, balanced: FsdpPolicy(),
    "shadow": lambda overlap, memory, per_node, balanced: ShadowPolicy(memory),
    "fssdp": lambda overlap, memory, per_node, balanced: FssdpPolicy(overlap, memory, per_node, balanced),
}
POLICIES = tuple(_BUILDERS)


def build_policy(
    name: str,
    overlap_budget: int,
    memory_budget: int,
    devices_per_node: int | None = None,
    min_imbalance: float = 1.0,
    field: str = "fssdp.policy",
) -> Policy:
    """The policy called ``name`` (``field`` names where the name came from). Each policy checks the budgets it
    uses when it is built."""
    if name not in _BUILDERS:
        raise ConfigError(field, f"must be one of {POLICIES}, got {name!r}")
    return _BUILDERS[name](overlap_budget, memory_budget, devices_per_node, min_imbalance)
