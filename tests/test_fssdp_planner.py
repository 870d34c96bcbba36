"""FSSDP planning: load estimate, replica planner, policies and heterogeneous re-sharding. Pure functions, no
processes; the expected plans below are computed by hand from the rules in the module docstrings."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.collectives import MaterializedPlacement, OwnerPlacement
from hecate.collectives.errors import CheckpointError, ConfigError, LayoutError
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
    initial_owners,
    moves,
    plan_replicas,
    predicted_device_load,
    reshard_owners,
)

FOUR = OwnerPlacement((0, 1, 2, 3), 4)  # one expert per device
# The planner updates its predicted loads incrementally; recomputing them from scratch may differ in the last bits.
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


def test_t_above_m_gives_hot_experts_proportional_copies_on_the_least_loaded_devices():
    # Total 100 over 4 devices = 25 per device: expert 0 (90) wants round(3.6) = 4 copies, the others 1.
    # Phase 1: the copies go to the least loaded device each time: 2 (3, index beats 3), 3, then 1 ->
    # predicted [22.5, 26.5, 25.5, 25.5]. Phase 2: the straggler, device 1, sends its expert 1 to the one
    # slot left, device 0 (22.5 + 2 <= 26.5).
    load_E = [90, 4, 3, 3]
    plan = plan_replicas(FOUR, load_E, overlap_budget=2, memory_budget=1)
    assert plan.devices_C == ((0, 1, 2, 3), (0, 1), (2,), (3,))
    assert predicted_device_load(plan, load_E) == [24.5, 24.5, 25.5, 25.5]


def test_straggler_relief_copies_a_warm_expert_that_shares_a_device():
    # Neither expert is worth a device on its own (40 and 30 of 50 per device), but together they make device 0
    # the straggler (70 vs 30): one copy of expert 0 to device 1 evens it out (30 + 20 <= 70).
    owner = OwnerPlacement((0, 0, 1, 1), 2)
    plan = plan_replicas(owner, [40, 30, 20, 10], overlap_budget=2, memory_budget=1)
    assert plan.devices_C == ((0, 1), (0,), (1,), (1,))
    assert predicted_device_load(plan, [40, 30, 20, 10]) == [50.0, 50.0]


def test_t_above_m_breaks_load_ties_towards_the_owners_node():
    # Expert 3 (40 of 25 per device) wants 2 copies; devices 0, 1 and 2 tie at 20. Phase 2 then balances the
    # rest to 25 each with the slots left, so the tie-break shows in where expert 3's copy went.
    load_E = [20, 20, 20, 40]
    assert plan_replicas(FOUR, load_E, 2, 1).devices_C == ((0, 1, 2, 3), (1,), (2,), (0, 3))  # by index
    assert plan_replicas(FOUR, load_E, 2, 1, devices_per_node=2).devices_C[3] == (2, 3)  # owner 3's node


def test_a_copy_that_would_only_move_the_straggler_is_not_made():
    # Expert 0 (38 of 100) wants 2 copies, but the least loaded device (20) would reach 20 + 19 = 39 > 38:
    # the even-split model is pessimistic here (the dispatcher could split 29/29), see planner.py.
    plan = plan_replicas(FOUR, [38, 21, 21, 20], overlap_budget=2, memory_budget=1)
    assert plan == MaterializedPlacement.from_owner(FOUR)


def test_overlap_budget_is_clipped_to_the_number_of_experts():
    everything = plan_replicas(FOUR, [1, 2, 3, 4], overlap_budget=100, memory_budget=100)
    assert everything == FsdpPolicy().materialize(FOUR, [1, 2, 3, 4])
    # clipped t = 4 > m = 3: the proportional branch, not "replicate 100 experts"
    assert plan_replicas(FOUR, [1, 1, 1, 1], overlap_budget=100, memory_budget=3) == \
        MaterializedPlacement.from_owner(FOUR)


@pytest.mark.parametrize("field, budgets", [("fssdp.overlap_budget", (-1, 2)), ("fssdp.memory_budget", (2, -1)),
                                            ("fssdp.overlap_budget", (1.5, 2))])
def test_bad_budgets_name_their_field(field, budgets):
    with pytest.raises(ConfigError) as error:
        plan_replicas(FOUR, [1, 1, 1, 1], *budgets)
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
    with pytest.raises(LayoutError, match="drops owners"):
        check_materialized(FOUR, MaterializedPlacement(((1,), (1,), (2,), (3,)), 4), memory_budget=1)
    with pytest.raises(LayoutError, match="memory_budget=1"):
        check_materialized(FOUR, MaterializedPlacement.from_owner(FOUR, [(0, 3), (1, 3)]), memory_budget=1)


@st.composite
def planning_cases(draw):
    world = draw(st.integers(1, 8))
    num_experts = draw(st.integers(1, 16))
    owner = OwnerPlacement(tuple(draw(st.lists(st.integers(0, world - 1), min_size=num_experts,
                                                 max_size=num_experts))), world)
    load_E = draw(st.lists(st.one_of(st.just(0.0), st.floats(0, 1e6)), min_size=num_experts,
                           max_size=num_experts))
    return (owner, load_E, draw(st.integers(0, 12)), draw(st.integers(0, 12)),
            draw(st.one_of(st.none(), st.integers(1, 4))))


@settings(max_examples=300, deadline=None)
@given(planning_cases())
def test_plans_contain_the_owners_and_respect_both_budgets(case):
    owner, load_E, overlap, memory, per_node = case
    plan = plan_replicas(owner, load_E, overlap, memory, per_node)
    assert all(owner.owner_C[e] in plan.devices_C[e] for e in range(owner.num_chunks))
    # a device receives at most m copies (memory) and at most t (what overlaps with attention)
    assert max(extras_per_device(owner, plan)) <= min(overlap, memory)
    assert plan == plan_replicas(owner, list(load_E), overlap, memory, per_node)  # same inputs, same plan
    if overlap > memory:  # the proportional branch never raises the predicted straggler
        ep_max = max(predicted_device_load(EpPolicy().materialize(owner, load_E), load_E))
        assert max(predicted_device_load(plan, load_E)) <= ep_max * (1 + FLOAT_SLACK) + FLOAT_SLACK


def test_fssdp_balances_zipf_load_better_than_ep():
    owner = initial_owners(16, 8)
    load_E = [1000 / (e + 1) ** 1.2 for e in range(16)]  # Zipf-skewed: expert 0 gets ~26% of the tokens
    ep = imbalance(predicted_device_load(EpPolicy().materialize(owner, load_E), load_E))
    fssdp = imbalance(predicted_device_load(FssdpPolicy(4, 2).materialize(owner, load_E), load_E))
    assert ep > 4.0  # device 0 owns experts 0 and 1
    assert fssdp < 1.25  # 16 spare slots (2 per device) almost even it out


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


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.data())
def test_resharding_keeps_e_over_d_experts_per_device_in_every_layer(world, per_device, layers, data):
    num_experts = world * per_device
    loads_LE = data.draw(st.lists(st.lists(st.floats(0, 1e3), min_size=num_experts, max_size=num_experts),
                                  min_size=layers, max_size=layers))
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
