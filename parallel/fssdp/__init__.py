"""Fully Sharded Sparse Data Parallelism: pure planning pieces (the Hecate paper, arXiv 2502.02581).

- ``LoadEstimator``: sliding-window per-expert load, the planner's input.
- ``plan_replicas`` / ``check_materialized`` / ``predicted_device_load``: this step's replicas under the
  overlap and memory budgets.
- ``budgets``: the overlap and memory budgets derived from measured times, bandwidth and memory (``auto``).
- ``calibrate``: this step's plan corrected with the router's real counts, when the saving beats the extra gather.
- ``Policy`` and ``build_policy``: ``ep``, ``fsdp``, ``shadow``, ``fssdp`` as interchangeable planners.
- ``initial_owners`` / ``reshard_owners`` / ``moves``: heterogeneous sharding of ownership over layers.

Nothing here touches process groups: every rank computes the same result from the same inputs.
"""

from hecate.parallel.fssdp.budgets import RecentMedian, memory_budget, overlap_budget, replica_bytes
from hecate.parallel.fssdp.calibration import Calibration, calibrate
from hecate.parallel.fssdp.load import LoadEstimator
from hecate.parallel.fssdp.planner import (
    check_materialized,
    hottest_experts,
    plan_replicas,
    predicted_device_load,
)
from hecate.parallel.fssdp.policies import (
    POLICIES,
    EpPolicy,
    FsdpPolicy,
    FssdpPolicy,
    Policy,
    ShadowPolicy,
    build_policy,
)
from hecate.parallel.fssdp.resharding import initial_owners, moves, reshard_owners

__all__ = [
    "POLICIES",
    "Calibration",
    "EpPolicy",
    "FsdpPolicy",
    "FssdpPolicy",
    "LoadEstimator",
    "Policy",
    "RecentMedian",
    "ShadowPolicy",
    "build_policy",
    "calibrate",
    "check_materialized",
    "hottest_experts",
    "initial_owners",
    "memory_budget",
    "moves",
    "overlap_budget",
    "plan_replicas",
    "predicted_device_load",
    "replica_bytes",
    "reshard_owners",
]
