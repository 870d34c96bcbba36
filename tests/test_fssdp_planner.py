"""FSSDP planning: load estimate, replica planner, policies and heterogeneous re-sharding. Pure functions, no
processes; the expected plans below are computed by hand from the rules in the module docstrings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.collectives import MaterializedPlacement, OwnerPlacement
from hecate.collectives.errors import CollectiveError, ConfigError
from hecate.parallel.errors import CheckpointError, LayoutError
from hecate.parallel.fssdp import (
    POLICIES,
    EpPolicy,
    FsdpPolicy,
    FssdpPolicy,
    LoadEstimator,
    Policy,
    ShadowPolicy,
    build_policy,
    check_materialized,
    hottest_experts,
    initial_owners,
    moves,
    plan_replicas,
    predicted_device_load,
    reshard_owners,
)
from hecate.parallel.fssdp.planner import apportion

FOUR = OwnerPlacement((0, 1, 2, 3), 4)  # one expert per device
ZIPF_16 = [1000 / (e + 1) ** 1.2 for e in range(16)]  # Zipf-skewed: expert 0 gets ~26% of the tokens
# Predicted loads sum floats in another order than expert parallelism's totals: equal values may differ in the last
# bits.
FLOAT_SLACK = 1e-9


def extras_per_device(owner: OwnerPlacement, materialized: MaterializedPlacement) -> list[int]:
    extra_D = [0] * owner.world_size
    for expert, holders in enumerate(materialized.devices_C):
        for device in holders:
            extra_D[device] += device != owner.owner_C[expert]
    return extra_D


def imbalance(load_D: list[float]) -> float:
    return max(load_D) / (sum(load_D) / len(load_D))


# --- load estimator ---------------------------------------------------------------------------------------


def test_estimator_is_uniform_before_any_update():
    assert LoadEstimator(3).estimate() == [1.0, 1.0, 1.0]


def test_estimator_averages_the_last_window_steps():
    estimator = LoadEstimator(2, window=2)
    for counts_E in ([1, 2], [3, 4], torch.tensor([5, 6])):
        estimator.update(counts_E)
    assert estimator.estimate() == [4.0, 5.0]  # mean of [3, 4] and [5, 6]; [1, 2] left the window
    assert estimator.num_updates == 2


def test_estimator_state_round_trips_and_a_smaller_window_keeps_the_latest_steps():
    estimator = LoadEstimator(2, window=3)
    for counts_E in ([0, 3], [3, 0], [6, 9]):
        estimator.update(counts_E)
    restored = LoadEstimator(2, window=3)
    restored.load_state_dict(estimator.state_dict())
    assert restored.estimate() == estimator.estimate() == [3.0, 4.0]
    narrower = LoadEstimator(2, window=1)
    narrower.load_state_dict(estimator.state_dict())
    assert narrower.estimate() == [6.0, 9.0]
    with pytest.raises(CheckpointError, match="for 2 experts, this layer has 3"):
        LoadEstimator(3).load_state_dict(estimator.state_dict())


def test_estimator_rejects_a_bad_window_and_wrong_counts():
    with pytest.raises(ConfigError) as error:
        LoadEstimator(4, window=0)
    assert error.value.field == "fssdp.window"
    with pytest.raises(LayoutError, match="one value per expert"):
        LoadEstimator(4).update([1, 2, 3])
    with pytest.raises(LayoutError, match=">= 0"):
        LoadEstimator(2).update([1, -1])


# --- planner ----------------------------------------------------------------------------------------------


def test_t_at_most_m_replicates_the_t_hottest_experts_everywhere():
    owner = OwnerPlacement((0, 0, 1, 1, 2, 2, 3, 3), 4)
    load_E = [1, 9, 3, 7, 2, 8, 4, 6]
    plan = plan_replicas(owner, load_E, overlap_budget=2, memory_budget=3)
    everywhere = (0, 1, 2, 3)
    assert plan.devices_C == ((0,), everywhere, (1,), (1,), (2,), everywhere, (3,), (3,))


def test_t_above_m_gives_hot_experts_copies_in_proportion_on_the_least_loaded_devices():
    # t = 2 > m = 1: the 4 slots go to the hot experts 0 (90) and 1 (4): 4 x 90/94 = 3.83 -> 3 (capped at
    # D - 1 = 3), the spare slot to expert 1. Shares: 90/4 = 22.5, 4/2 = 2; devices start at [22.5, 2, 3, 3].
    # Expert 0's copies go to devices 1 (2), 2 (3, index beats 3), 3; expert 1's to the one free slot, device 0.
    load_E = [90, 4, 3, 3]
    plan = plan_replicas(FOUR, load_E, overlap_budget=2, memory_budget=1)
    assert plan.devices_C == ((0, 1, 2, 3), (0, 1), (2,), (3,))
    # the dispatcher's split: experts 2, 3 stay put (3 each), 90 is water-filled to 24 everywhere, then 4 -> 26, 26
    assert predicted_device_load(plan, load_E) == [26.0, 26.0, 24.0, 24.0]


def test_apportion_is_proportional_with_caps_and_largest_remainders():
    # quotas 16 x load / 1892.4 = 8.45, 3.68, 2.26, 1.60: expert 0 is capped at 7; floors 7, 3, 2, 1; the 3 spare
    # slots by remainder: expert 1 (.68), expert 3 (.60), expert 0 has no room, expert 2 (.26)
    assert apportion(16, [1000.0, 435.3, 267.6, 189.5], [7] * 4) == [7, 4, 3, 2]
    assert apportion(5, [1.0, 1.0], [1, 10]) == [1, 4]  # what the capped item cannot take goes to the other
    assert apportion(10, [1.0], [3]) == [3]
    assert apportion(3, [1.0, 1.0, 1.0, 1.0], [5] * 4) == [1, 1, 1, 0]  # ties by position


def test_t_limits_the_experts_replicated_when_t_exceeds_m():
    owner, load_E = initial_owners(16, 8), ZIPF_16
    three = plan_replicas(owner, load_E, overlap_budget=3, memory_budget=2)
    assert {e for e, holders in enumerate(three.devices_C) if len(holders) > 1} == {0, 1, 2}
    assert three != plan_replicas(owner, load_E, overlap_budget=16 + 5, memory_budget=2)


def test_zipf_load_uses_every_slot_and_evens_out_the_devices():
    owner, load_E = initial_owners(16, 8), ZIPF_16
    plan = plan_replicas(owner, load_E, overlap_budget=4, memory_budget=2)
    assert extras_per_device(owner, plan) == [2] * 8  # all 16 slots used
    assert [len(holders) - 1 for holders in plan.devices_C[:4]] == [7, 4, 3, 2]  # apportioned as above
    assert all(len(holders) == 1 for holders in plan.devices_C[4:])
    ep = imbalance(predicted_device_load(EpPolicy().materialize(owner, load_E), load_E))
    assert ep > 4.0  # device 0 owns experts 0 and 1
    assert imbalance(predicted_device_load(plan, load_E)) < 1.1


def test_node_level_pass_puts_a_copy_on_every_node_before_a_second_on_any():
    # 8 devices, experts 0 and 7 hot (40 each, owners 0 and 7): 4 copies each. One node: equal loads go to the lower
    # index, so expert 0 lands on devices 1, 2, 3 (nodes 0, 1) and 7 but not on node 2 = devices 4, 5.
    owner, load_E = initial_owners(8, 8), [40, 10, 10, 10, 10, 10, 10, 40]
    nodes = [[0, 1], [2, 3], [4, 5], [6, 7]]
    one_node = plan_replicas(owner, load_E, overlap_budget=2, memory_budget=1)
    assert one_node.devices_C[0] == (0, 1, 2, 3, 7)
    spread = plan_replicas(owner, load_E, overlap_budget=2, memory_budget=1, devices_per_node=2)
    for expert in (0, 7):
        assert all(set(spread.devices_C[expert]) & set(node) for node in nodes), spread.devices_C[expert]
    assert max(predicted_device_load(spread, load_E)) == max(predicted_device_load(one_node, load_E))


def test_guard_drops_copies_that_the_dispatcher_would_split_worse_than_ep():
    # Hot experts 0 (12, owner 2), 3 (11, owner 0), 1 (10, owner 1), one copy each: to devices 1, 2 and 0. The
    # dispatcher water-fills hottest first: 12 -> devices 1, 2 at 6; 11 -> devices 0, 2 at 8.5; 10 -> devices 0, 1
    # at 12.25 > 12 (expert parallelism's maximum). Without the last copy it is 11 everywhere.
    owner, load_E = OwnerPlacement((2, 1, 0, 0, 1, 1), 3), [12, 10, 0, 11, 0, 0]
    assert (
        max(predicted_device_load(MaterializedPlacement.from_owner(owner, [(0, 1), (3, 2), (1, 0)]), load_E)) == 12.25
    )
    plan = plan_replicas(owner, load_E, overlap_budget=3, memory_budget=1)
    assert plan == MaterializedPlacement.from_owner(owner, [(0, 1), (3, 2)])
    assert predicted_device_load(plan, load_E) == [11.0, 11.0, 11.0]


def test_overlap_budget_is_clipped_to_the_number_of_experts():
    everything = plan_replicas(FOUR, [1, 2, 3, 4], overlap_budget=100, memory_budget=100)
    assert everything == FsdpPolicy().materialize(FOUR, [1, 2, 3, 4])
    # clipped t = 4 > m = 3: the proportional branch over all 4 experts, not "replicate 100 experts"
    assert max(extras_per_device(FOUR, plan_replicas(FOUR, [1, 1, 1, 1], overlap_budget=100, memory_budget=3))) <= 3


@pytest.mark.parametrize(
    "field, budgets",
    [("fssdp.overlap_budget", (-1, 2)), ("fssdp.memory_budget", (2, -1)), ("fssdp.overlap_budget", (1.5, 2))],
)
def test_bad_budgets_name_their_field(field, budgets):
    with pytest.raises(ConfigError) as error:
        FssdpPolicy(*budgets)
    assert error.value.field == field
    with pytest.raises(ConfigError) as error:
        build_policy("fssdp", *budgets)
    assert error.value.field == field


def test_planning_is_deterministic_and_breaks_equal_loads_by_index():
    owner = initial_owners(8, 4)
    load_E = [5.0] * 8
    plans = {plan_replicas(owner, load_E, 2, 2) for _ in range(3)}
    assert len(plans) == 1
    (plan,) = plans
    assert plan.devices_C[:2] == ((0, 1, 2, 3),) * 2 and plan.devices_C[2:] == tuple((e // 2,) for e in range(2, 8))


def test_check_materialized_rejects_a_dropped_owner_and_an_overfull_device():
    with pytest.raises(CollectiveError, match="missing"):
        check_materialized(FOUR, MaterializedPlacement(((1,), (1,), (2,), (3,)), 4), memory_budget=1)
    with pytest.raises(LayoutError, match="memory_budget=1"):
        check_materialized(FOUR, MaterializedPlacement.from_owner(FOUR, [(0, 3), (1, 3)]), memory_budget=1)


@st.composite
def planning_cases(draw):
    world = draw(st.integers(1, 8))
    num_experts = draw(st.integers(1, 16))
    owner = OwnerPlacement(
        tuple(draw(st.lists(st.integers(0, world - 1), min_size=num_experts, max_size=num_experts))), world
    )
    load_E = draw(
        st.lists(
            st.one_of(st.just(0.0), st.integers(0, 50).map(float), st.floats(0, 1e6)),
            min_size=num_experts,
            max_size=num_experts,
        )
    )
    return (
        owner,
        load_E,
        draw(st.integers(0, 12)),
        draw(st.integers(0, 12)),
        draw(st.one_of(st.none(), st.integers(1, 4))),
    )


@settings(max_examples=500, deadline=None)
@given(planning_cases())
def test_plans_keep_the_owners_respect_both_budgets_and_never_predict_worse_than_ep(case):
    owner, load_E, overlap, memory, per_node = case
    plan = plan_replicas(owner, load_E, overlap, memory, per_node)
    assert all(owner.owner_C[e] in plan.devices_C[e] for e in range(owner.num_chunks))
    # a device receives at most m copies (memory) and at most t (what overlaps with attention)
    assert max(extras_per_device(owner, plan)) <= min(overlap, memory)
    replicated = {e for e, holders in enumerate(plan.devices_C) if len(holders) > 1}
    assert replicated <= set(hottest_experts(load_E, overlap))  # at most t distinct experts, the hottest
    assert all(load_E[e] > 0 for e in replicated)
    ep_max = max(predicted_device_load(EpPolicy().materialize(owner, load_E), load_E))
    assert max(predicted_device_load(plan, load_E)) <= ep_max * (1 + FLOAT_SLACK) + FLOAT_SLACK
    assert plan == plan_replicas(owner, list(load_E), overlap, memory, per_node)  # same inputs, same plan


# --- policies ---------------------------------------------------------------------------------------------


def test_ep_keeps_the_owner_placement_and_fsdp_puts_every_expert_everywhere():
    assert EpPolicy().materialize(FOUR, [4, 3, 2, 1]) == MaterializedPlacement.from_owner(FOUR)
    assert FsdpPolicy().materialize(FOUR, [4, 3, 2, 1]).devices_C == ((0, 1, 2, 3),) * 4


def test_shadow_broadcasts_the_num_hot_hottest_experts():
    plan = ShadowPolicy(2).materialize(FOUR, [1, 7, 3, 9])
    assert plan.devices_C == ((0,), (0, 1, 2, 3), (2,), (0, 1, 2, 3))
    assert ShadowPolicy(10).materialize(FOUR, [1, 7, 3, 9]).devices_C == ((0, 1, 2, 3),) * 4


def test_build_policy_maps_names_to_planners():
    built = {name: build_policy(name, overlap_budget=3, memory_budget=2, devices_per_node=2) for name in POLICIES}
    assert all(isinstance(policy, Policy) and policy.name == name for name, policy in built.items())
    assert built["shadow"] == ShadowPolicy(2)
    assert built["fssdp"] == FssdpPolicy(3, 2, 2)
    with pytest.raises(ConfigError, match="must be one of") as error:
        build_policy("zero3", 1, 1)
    assert error.value.field == "fssdp.policy"


# --- heterogeneous re-sharding ----------------------------------------------------------------------------


def test_initial_owners_are_contiguous_blocks():
    assert initial_owners(8, 4).owner_C == (0, 0, 1, 1, 2, 2, 3, 3)
    with pytest.raises(LayoutError, match="multiple"):
        initial_owners(6, 4)


def test_resharding_spreads_the_hot_experts_of_different_layers():
    # Layer 0: 8 -> dev 0, 4 -> dev 1, 2 -> dev 1 (accumulated 4 < 8), dev 1 is full, 1 -> dev 0.  Totals [9, 6].
    # Layer 1: 8 -> dev 1 (6 < 9), 4 -> dev 0, 2 -> dev 0, dev 0 is full, 1 -> dev 1.              Totals [15, 15].
    owners = reshard_owners([[8, 4, 2, 1], [8, 4, 2, 1]], num_devices=2)
    assert [o.owner_C for o in owners] == [(0, 1, 1, 0), (1, 0, 0, 1)]
    # expert parallelism would put expert 0 of both layers on device 0: 24 tokens against 6
    ep = initial_owners(4, 2)
    assert moves(ep, owners[0]) == [(1, 0, 1), (3, 1, 0)]
    assert moves(ep, ep) == []


def test_resharding_breaks_ties_towards_the_least_loaded_node():
    loads = [[4, 3, 2, 1]]
    assert reshard_owners(loads, 4)[0].owner_C == (0, 1, 2, 3)
    # with 2 devices per node, expert 1 goes to the other node than expert 0, and so on
    assert reshard_owners(loads, 4, devices_per_node=2)[0].owner_C == (0, 2, 3, 1)


def test_resharding_balances_nodes_before_devices():
    # Nodes {0, 1} and {2, 3}. Layer 0: 4 -> node 0, device 0; 3 -> node 1 (0 < 4/2), device 2; 0 -> node 1
    # (3/2 < 4/2), device 3; 0 -> node 0, device 1: devices [4, 0, 3, 0]. Layer 1: 6 -> node 1 (3/2 < 2), device 3;
    # 2 -> node 0 (2 < 9/2), device 1; 2 -> node 0 (3 < 4.5), device 0; 0 -> device 2: nodes 8 and 9.
    # Device first (the node only breaking ties) gives the same device maximum, 6, but nodes 6 and 11.
    loads_LE = [[4, 3, 0, 0], [2, 6, 2, 0]]
    owners = reshard_owners(loads_LE, 4, devices_per_node=2)
    assert [o.owner_C for o in owners] == [(0, 2, 3, 1), (1, 3, 0, 2)]
    device_D = [sum(load_E[e] for load_E, o in zip(loads_LE, owners) for e in o.chunks_on(d)) for d in range(4)]
    assert device_D == [6, 2, 3, 6]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.data())
def test_resharding_keeps_e_over_d_experts_per_device_in_every_layer(world, per_device, layers, data):
    num_experts = world * per_device
    loads_LE = data.draw(
        st.lists(
            st.lists(st.floats(0, 1e3), min_size=num_experts, max_size=num_experts), min_size=layers, max_size=layers
        )
    )
    for owner in reshard_owners(loads_LE, world):
        assert [len(owner.chunks_on(d)) for d in range(world)] == [per_device] * world


def test_resharding_rejects_experts_that_do_not_divide_over_devices():
    with pytest.raises(LayoutError, match="moe.num_experts=6"):
        reshard_owners([[1] * 6], 4)


def test_no_replicas_while_the_owners_are_balanced_enough():
    """fssdp.min_imbalance: a 4% imbalance is left alone under 1.05 and planned for under 1.0 (always plan)."""
    owner = initial_owners(4, 2)
    near_even = [26.0, 26.0, 24.0, 24.0]  # devices 52 and 48: max / mean 1.04
    assert plan_replicas(owner, near_even, 2, 2, min_imbalance=1.05) == MaterializedPlacement.from_owner(owner)
    assert plan_replicas(owner, near_even, 2, 2, min_imbalance=1.0) != MaterializedPlacement.from_owner(owner)
    skewed = [60.0, 20.0, 10.0, 10.0]  # max / mean 1.6: planned either way
    assert plan_replicas(owner, skewed, 2, 2, min_imbalance=1.05) != MaterializedPlacement.from_owner(owner)
