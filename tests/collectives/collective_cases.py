"""Checks that run inside N real worker processes, on any transport: gloo workers started by the simulated
launcher and MPI ranks started by ``mpirun`` run the same code (see ``run_all``) and report by rank.

Hypothesis runs inside the workers, identically on every rank (``derandomize``), and every example ends with
an agreement all-gather, so a failure on any rank fails the example on all ranks and they shrink in step.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hecate.collectives import (
    ChunkSpec,
    MaterializedPlacement,
    OwnerPlacement,
    PeerOp,
    SparseAllGather,
    SparseReduceScatter,
    Transport,
    all_to_all_autograd,
    delta,
)
from hecate.collectives.errors import CollectiveError

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (rtol, atol) for a sum of a few copies against a float64 sum of the same values. bf16/fp16 sums are
# accumulated in fp32 and rounded once, so they are off by at most half a unit in the last place (2^-8, 2^-11
# relative); fp32/fp64 sums add in another order than the reference, a few ulps of the largest partial sum
# (|values| < ~10 here).
SUM_TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (2.0**-8, 1e-6),
    torch.float16: (2.0**-11, 1e-6),
}
MAX_CHUNKS = 7
MAX_FLAT_NUMEL = 300


@dataclass(frozen=True)
class Case:
    owner: OwnerPlacement
    materialized: MaterializedPlacement
    specs: tuple[ChunkSpec, ...]
    seed: int


_shapes = st.one_of(
    st.tuples(st.integers(0, MAX_FLAT_NUMEL)),
    st.tuples(st.integers(1, 6), st.integers(1, 9)),
)
_specs = st.builds(ChunkSpec, _shapes, st.sampled_from(DTYPES))


@st.composite
def cases(draw, world_size: int) -> Case:
    num_chunks = draw(st.integers(1, MAX_CHUNKS))
    owner_C = draw(st.lists(st.integers(0, world_size - 1), min_size=num_chunks, max_size=num_chunks))
    pair = st.tuples(st.integers(0, num_chunks - 1), st.integers(0, world_size - 1))
    replicas = draw(st.sets(pair, max_size=num_chunks * world_size))
    specs = draw(st.lists(_specs, min_size=num_chunks, max_size=num_chunks))
    owner = OwnerPlacement(tuple(owner_C), world_size)
    return Case(owner, MaterializedPlacement.from_owner(owner, replicas), tuple(specs), draw(st.integers(0, 2**31)))


def chunk_value(seed: int, chunk: int, device: int, spec: ChunkSpec) -> torch.Tensor:
    """The copy of ``chunk`` on ``device``: known to every rank, so each can compute the dense reference."""
    generator = torch.Generator().manual_seed(seed * 4099 + chunk * 67 + device)
    return torch.randn(spec.shape, generator=generator, dtype=torch.float64).to(spec.dtype)


def all_gather_ints(transport: Transport, values: list[int]) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64)
    everyone = torch.empty(len(values) * transport.world_size, dtype=torch.int64)
    transport.all_gather(everyone, mine, name="test.all_gather").wait()
    return everyone.view(transport.world_size, len(values)).tolist()


def agree(transport: Transport, failure: str | None) -> None:
    """Raise on every rank if any rank failed, so all ranks see the same outcome of each example."""
    flags = [row[0] for row in all_gather_ints(transport, [int(failure is not None)])]
    if any(flags):
        bad = [r for r, flag in enumerate(flags) if flag]
        raise AssertionError(f"ranks {bad} failed; this rank: {failure or 'passed'}")


def check_gather(transport: Transport, case: Case) -> None:
    rank, devices_C = transport.rank, case.materialized.devices_C
    gather = SparseAllGather(case.owner, case.materialized, case.specs, transport)
    owned = {c: chunk_value(case.seed, c, rank, case.specs[c]) for c in case.owner.chunks_on(rank)}
    before = transport.stats.snapshot()
    replicas = gather(owned)
    stats = delta(transport.stats.snapshot(), before)["sparse_all_gather"]
    expected = [c for c in case.materialized.chunks_on(rank) if case.owner.owner_C[c] != rank]
    assert sorted(replicas) == expected, (sorted(replicas), expected)
    for chunk, replica in replicas.items():
        reference = chunk_value(case.seed, chunk, case.owner.owner_C[chunk], case.specs[chunk])
        assert replica.dtype == reference.dtype and torch.equal(replica, reference), f"chunk {chunk} differs"
    nbytes = [spec.nbytes for spec in case.specs]
    assert stats.bytes_sent == sum((len(devices_C[c]) - 1) * nbytes[c] for c in owned), stats
    assert stats.bytes_received == sum(nbytes[c] for c in expected), stats
    total_sent = sum(row[0] for row in all_gather_ints(transport, [stats.bytes_sent]))
    assert total_sent == sum((len(devices) - 1) * nbytes[c] for c, devices in enumerate(devices_C))
    # released replicas of mixed dtypes and shapes (views of the receive buffer, or copies where a chunk's bytes
    # do not start on an element boundary) are reused by the next call, which still delivers the same values
    gather.release(replicas)
    again = gather(owned)
    assert sorted(again) == expected and all(
        torch.equal(again[c], chunk_value(case.seed, c, case.owner.owner_C[c], case.specs[c])) for c in again
    )


def check_reduce_scatter(transport: Transport, case: Case) -> None:
    rank, devices_C = transport.rank, case.materialized.devices_C
    reduce = SparseReduceScatter(case.owner, case.materialized, case.specs, transport)
    held = {c: chunk_value(case.seed, c, rank, case.specs[c]) for c in case.materialized.chunks_on(rank)}
    before = transport.stats.snapshot()
    sums = reduce(held)
    stats = delta(transport.stats.snapshot(), before)["sparse_reduce_scatter"]
    owned = case.owner.chunks_on(rank)
    assert sorted(sums) == list(owned), (sorted(sums), owned)
    for chunk, total in sums.items():
        spec = case.specs[chunk]
        reference = sum(chunk_value(case.seed, chunk, d, spec).double() for d in devices_C[chunk])
        rtol, atol = SUM_TOLERANCE[spec.dtype]
        assert total.dtype == spec.dtype and tuple(total.shape) == spec.shape
        torch.testing.assert_close(total.double(), reference, rtol=rtol, atol=atol)
    nbytes = [spec.nbytes for spec in case.specs]
    assert stats.bytes_sent == sum(nbytes[c] for c in held if c not in owned), stats
    assert stats.bytes_received == sum((len(devices_C[c]) - 1) * nbytes[c] for c in owned), stats


def check_properties(transport: Transport, max_examples: int) -> dict:
    """Random placements, chunk shapes and dtypes against the dense reference; returns the example count."""
    examples = []

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )
    @given(case=cases(transport.world_size))
    def sparse_collectives_match_dense_reference(case: Case) -> None:
        examples.append(case)
        try:
            check_gather(transport, case)
            check_reduce_scatter(transport, case)
            failure = None
        except Exception:
            failure = traceback.format_exc()
        agree(transport, failure)

    sparse_collectives_match_dense_reference()
    return {"examples": len(examples)}


def check_primitives(transport: Transport) -> dict:
    """Each transport operation against its definition, with the accounted bytes."""
    rank, world = transport.rank, transport.world_size
    stats = transport.stats

    splits_out_P = [(rank + p) % 3 for p in range(world)]
    splits_in_P = [(p + rank) % 3 for p in range(world)]
    send = torch.cat([torch.full((n, 2), 100.0 * rank + p) for p, n in enumerate(splits_out_P)])
    recv = torch.empty(sum(splits_in_P), 2)
    transport.all_to_all(recv, send, splits_in_P, splits_out_P, name="t.a2a").wait()
    assert torch.equal(recv, torch.cat([torch.full((n, 2), 100.0 * p + rank) for p, n in enumerate(splits_in_P)]))
    row = 2 * 4
    assert stats.snapshot()["t.a2a"].bytes_sent == (sum(splits_out_P) - splits_out_P[rank]) * row

    gathered = torch.empty(2 * world, dtype=torch.bfloat16)
    transport.all_gather(gathered, torch.full((2,), float(rank), dtype=torch.bfloat16), name="t.ag").wait()
    assert torch.equal(gathered, torch.arange(world, dtype=torch.bfloat16).repeat_interleave(2))
    assert stats.snapshot()["t.ag"].bytes_received == 2 * 2 * (world - 1)

    scattered = torch.empty(3, dtype=torch.float64)
    transport.reduce_scatter(scattered, torch.arange(3.0 * world, dtype=torch.float64) + rank, name="t.rs").wait()
    expected = (torch.arange(3.0, dtype=torch.float64) + 3 * rank) * world + sum(range(world))
    assert torch.equal(scattered, expected)

    summed = torch.full((5,), rank + 1.0, dtype=torch.bfloat16)
    transport.all_reduce(summed, name="t.ar").wait()
    assert torch.equal(summed, torch.full((5,), world * (world + 1) / 2, dtype=torch.bfloat16))
    largest = torch.tensor([float(rank), -float(rank)])
    transport.all_reduce(largest, reduce="max").wait()
    assert torch.equal(largest, torch.tensor([world - 1.0, 0.0]))

    shared = torch.full((4,), float(rank))
    transport.broadcast(shared, world - 1, name="t.bc").wait()
    assert torch.equal(shared, torch.full((4,), world - 1.0))

    right, left = (rank + 1) % world, (rank - 1) % world
    incoming = torch.empty(3)
    transport.batch_p2p(
        [PeerOp("send", torch.full((3,), float(rank)), right), PeerOp("recv", incoming, left)], name="t.p2p"
    ).wait()
    assert torch.equal(incoming, torch.full((3,), float(left)))
    assert stats.snapshot()["t.p2p"].bytes_sent == (12 if world > 1 else 0)  # messages to oneself stay local

    transport.barrier().wait()
    return {"ok": True}


def check_async_overlap(transport: Transport) -> dict:
    """A sparse all-gather and an all-reduce in flight while computation runs give the synchronous results;
    a released result's memory is reused by the next call."""
    rank, world = transport.rank, transport.world_size
    owner = OwnerPlacement(tuple(c % world for c in range(2 * world)), world)
    everywhere = MaterializedPlacement(tuple(tuple(range(world)) for _ in range(2 * world)), world)
    spec = ChunkSpec.flat(64 * 1024)
    gather = SparseAllGather(owner, everywhere, spec, transport)
    owned = {c: chunk_value(7, c, rank, spec) for c in owner.chunks_on(rank)}
    synchronous = gather(owned)

    in_flight = gather.start(owned)
    total = torch.full((1000,), float(rank))
    reducing = transport.all_reduce(total)
    x = torch.randn(256, 256)
    for _ in range(20):
        x = torch.tanh(x @ x.T / 256)
    replicas = in_flight.wait()
    assert in_flight.wait() is replicas
    assert reducing.wait() is total and torch.equal(total, torch.full((1000,), float(sum(range(world)))))
    assert sorted(replicas) == sorted(synchronous)
    assert all(torch.equal(replicas[c], synchronous[c]) for c in replicas)

    storage = next(iter(replicas.values())).untyped_storage().data_ptr()
    gather.release(replicas)
    again = gather(owned)
    assert next(iter(again.values())).untyped_storage().data_ptr() == storage, "released memory was not reused"
    assert all(torch.equal(again[c], synchronous[c]) for c in again)
    return {"ok": bool(torch.isfinite(x).all())}


def check_autograd(transport: Transport) -> dict:
    """Gradients of a loss through the differentiable all-to-all equal those of the dense reference."""
    rank, world, hidden = transport.rank, transport.world_size, 3
    splits_SD = [[(2 * s + 3 * d) % 5 for d in range(world)] for s in range(world)]  # not symmetric
    inputs = [
        torch.randn(
            sum(splits_SD[s]),
            hidden,
            generator=torch.Generator().manual_seed(s),
            dtype=torch.float64,
            requires_grad=True,
        )
        for s in range(world)
    ]
    weights = [
        torch.randn(
            sum(splits_SD[s][d] for s in range(world)),
            hidden,
            generator=torch.Generator().manual_seed(100 + d),
            dtype=torch.float64,
        )
        for d in range(world)
    ]

    mine = inputs[rank].detach().clone().requires_grad_(True)
    out = all_to_all_autograd(mine, splits_SD[rank], [splits_SD[s][rank] for s in range(world)], transport)
    (out * weights[rank]).sum().backward()

    pieces = [torch.split(inputs[s], splits_SD[s]) for s in range(world)]
    dense_out = [torch.cat([pieces[s][d] for s in range(world)]) for d in range(world)]
    sum((dense_out[d] * weights[d]).sum() for d in range(world)).backward()
    assert torch.equal(out, dense_out[rank].detach())
    assert torch.equal(mine.grad, inputs[rank].grad)
    assert transport.stats.snapshot()["all_to_all.backward"].calls == 1
    return {"ok": True}


def check_errors(transport: Transport) -> dict:
    """Each precondition violation raises CollectiveError on every rank (none hangs); returns the messages."""
    rank, world = transport.rank, transport.world_size
    num_chunks, spec = 2 * world, ChunkSpec.flat(4)
    owner = OwnerPlacement(tuple(c % world for c in range(num_chunks)), world)
    materialized = MaterializedPlacement.from_owner(owner, [(0, world - 1), (1, 0)])
    owned = {c: torch.ones(4) for c in owner.chunks_on(rank)}
    held = {c: torch.ones(4) for c in materialized.chunks_on(rank)}

    def on_rank_1(replace: Callable[[dict], dict], chunks: dict) -> dict:
        return replace(dict(chunks)) if rank == 1 else chunks

    def gather(chunks: dict, placed: MaterializedPlacement = materialized) -> None:
        SparseAllGather(owner, placed, spec, transport)(chunks)

    cases = {
        "not_surjective": lambda: OwnerPlacement.from_pairs([(c, 0) for c in range(1, num_chunks)], num_chunks, world),
        "not_subset": lambda: gather(owned, MaterializedPlacement.from_pairs([(0, 0)], num_chunks, world)),
        "rank_out_of_range": lambda: MaterializedPlacement.from_owner(owner, [(0, world)]),
        "world_mismatch": lambda: SparseAllGather(
            OwnerPlacement((0,) * num_chunks, world + 1),
            MaterializedPlacement(((0,),) * num_chunks, world + 1),
            spec,
            transport,
        ),
        "spec_count": lambda: SparseAllGather(owner, materialized, [spec], transport),
        "shape_on_rank_1": lambda: gather(on_rank_1(lambda d: d | {1: torch.ones(5)}, owned)),
        "dtype_on_rank_1": lambda: gather(on_rank_1(lambda d: d | {1: torch.ones(4, dtype=torch.float16)}, owned)),
        "missing_on_rank_1": lambda: gather(on_rank_1(lambda d: {}, owned)),
        "reduce_shape_on_rank_1": lambda: SparseReduceScatter(owner, materialized, spec, transport)(
            on_rank_1(lambda d: d | {1: torch.ones(2, 2)}, held)
        ),
        "ranks_disagree": lambda: gather(
            owned, materialized if rank == 0 else MaterializedPlacement.from_owner(owner, [(1, 0)])
        ),
    }
    messages = {}
    for label, case in cases.items():
        try:
            case()
            messages[label] = "no error"
        except CollectiveError as e:
            messages[label] = str(e)
    gather(owned)
    messages["healthy_after_errors"] = "ok"
    return messages


def run_check(check: Callable[..., dict], *args) -> dict:
    started = time.perf_counter()
    try:
        result = check(*args)
    except Exception:
        return {"error": traceback.format_exc()}
    return result | {"seconds": round(time.perf_counter() - started, 2)}


def run_all(
    world: Transport,
    transport_of_size: Callable[[int], Transport | None],
    wait_for_others: Callable[[], None],
    max_examples: int,
) -> dict:
    """Every check on this rank: properties and primitives on 1..world ranks (a transport over ranks
    0..n-1, None on the ranks outside it, which wait), then async, autograd and errors on all ranks."""
    results = {}
    for size in range(1, world.world_size + 1):
        transport = transport_of_size(size)
        if transport is not None:
            results[f"properties_{size}"] = run_check(check_properties, transport, max_examples)
            results[f"primitives_{size}"] = run_check(check_primitives, transport)
            results[f"autograd_{size}"] = run_check(check_autograd, transport)
        wait_for_others()
    results["async"] = run_check(check_async_overlap, world)
    results["errors"] = run_check(check_errors, world)
    return results
