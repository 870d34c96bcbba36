"""Placements and plan compilation: pure functions, checked without processes."""

import pytest
import torch
from collective_cases import Case, cases
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.collectives import ChunkSpec, MaterializedPlacement, OwnerPlacement, gather_plan, reduce_scatter_plan
from hecate.collectives.chunk_exchange import local_problem
from hecate.collectives.errors import CollectiveError

SPEC = ChunkSpec.flat(10)  # 40 bytes
OWNER = OwnerPlacement((0, 1, 1, 2), 3)
MATERIALIZED = MaterializedPlacement.from_owner(OWNER, [(0, 2), (0, 1), (2, 0), (3, 2)])


def test_gather_plan_sends_each_replica_from_its_owner():
    plan = gather_plan(OWNER, MATERIALIZED, (SPEC,) * 4)
    assert plan.routes == (
        ((), (0,), (0,)),
        ((2,), (), ()),
        ((), (), ()),
    )
    assert plan.send_bytes_P(0) == [0, 40, 40]
    assert plan.recv_bytes_P(0) == [0, 40, 0]
    assert plan.total_bytes == 3 * 40


def test_reduce_scatter_plan_returns_every_replica_to_its_owner():
    plan = reduce_scatter_plan(OWNER, MATERIALIZED, (SPEC,) * 4)
    assert plan.routes == (
        ((), (2,), ()),
        ((0,), (), ()),
        ((0,), (), ()),
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(cases))
def test_plan_moves_replicas_times_chunk_bytes(case: Case):
    plan = gather_plan(case.owner, case.materialized, case.specs)
    replica_bytes = sum(
        (len(devices) - 1) * case.specs[c].nbytes for c, devices in enumerate(case.materialized.devices_C)
    )
    assert plan.total_bytes == replica_bytes
    assert reduce_scatter_plan(case.owner, case.materialized, case.specs).total_bytes == replica_bytes
    for src in range(plan.world_size):
        assert plan.routes[src][src] == ()
        assert sum(plan.send_bytes_P(src)) == sum(
            (len(case.materialized.devices_C[c]) - 1) * case.specs[c].nbytes for c in case.owner.chunks_on(src)
        )


def test_equal_placements_share_one_cached_plan_and_fingerprint():
    copy_owner = OwnerPlacement([0, 1, 1, 2], 3)
    copy_materialized = MaterializedPlacement(MATERIALIZED.devices_C, 3)
    assert gather_plan(OWNER, MATERIALIZED, (SPEC,) * 4) is gather_plan(copy_owner, copy_materialized, (SPEC,) * 4)
    other = MaterializedPlacement.from_owner(OWNER, [(0, 2)])
    assert (
        gather_plan(OWNER, other, (SPEC,) * 4).fingerprint != gather_plan(OWNER, MATERIALIZED, (SPEC,) * 4).fingerprint
    )


def test_owner_placement_from_pairs_must_give_every_chunk_exactly_one_owner():
    assert OwnerPlacement.from_pairs([(1, 2), (0, 0)], 2, 3) == OwnerPlacement((0, 2), 3)
    with pytest.raises(CollectiveError, match=r"not surjective: chunks \[1\] have no owner"):
        OwnerPlacement.from_pairs([(0, 0)], 2, 3)
    with pytest.raises(CollectiveError, match=r"more than one owner: \{0: \[0, 1\]\}"):
        OwnerPlacement.from_pairs([(0, 0), (0, 1), (1, 1)], 2, 3)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: OwnerPlacement((0, 3), 3), "chunk 1 is placed on device 3, outside the ranks 0..2"),
        (lambda: OwnerPlacement((0,), 0), "world_size must be at least 1"),
        (lambda: MaterializedPlacement.from_pairs([(2, 0)], 2, 3), "chunk 2 is outside the chunks 0..1"),
        (
            lambda: gather_plan(OWNER, MaterializedPlacement.from_pairs([(0, 0)], 4, 3), (SPEC,) * 4),
            r"not a subset of the materialized placement: \(chunk, owner\) pairs \[\(1, 1\), \(2, 1\), \(3, 2\)\]",
        ),
        (
            lambda: gather_plan(OWNER, MaterializedPlacement(MATERIALIZED.devices_C, 4), (SPEC,) * 4),
            "over 3 devices but the materialized one over 4",
        ),
        (
            lambda: gather_plan(OWNER, MaterializedPlacement(MATERIALIZED.devices_C[:3], 3), (SPEC,) * 3),
            "has 4 chunks but the materialized one 3",
        ),
        (lambda: gather_plan(OWNER, MATERIALIZED, (SPEC,) * 3), "got 3 chunk specs for 4 chunks"),
    ],
)
def test_bad_placements_and_specs_are_refused_with_a_clear_message(build, message):
    with pytest.raises(CollectiveError, match=message):
        build()


def test_local_chunks_are_checked_against_placement_and_specs():
    specs = (SPEC, ChunkSpec((2, 3), torch.bfloat16))
    cpu = torch.device("cpu")
    good = {0: torch.zeros(10), 1: torch.zeros(2, 3, dtype=torch.bfloat16)}
    assert local_problem(good, (0, 1), specs, cpu) is None
    assert (
        local_problem({0: good[0]}, (0, 1), specs, cpu) == "the placement puts chunks [0, 1] here, but got chunks [0]"
    )
    assert local_problem(good | {1: torch.zeros(6, dtype=torch.bfloat16)}, (0, 1), specs, cpu) == (
        "chunk 1 is (6,) bfloat16 but its spec says (2, 3) bfloat16"
    )
    assert local_problem(good, (0, 1), specs, torch.device("meta")) == "chunk 0 is on cpu, the collective runs on meta"
