"""Transports and sparse collectives on real processes: gloo workers from the simulated launcher, and the
same checks over the MPI transport under a real ``mpirun``. Each suite starts its processes once; the checks
in ``collective_cases.py`` run inside them and every test below asserts one part of their reports."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from collective_cases import run_all
from torch.distributed.device_mesh import init_device_mesh

from hecate.collectives import TorchTransport
from hecate.launch.simulate import run_workers

pytestmark = pytest.mark.slow  # starts processes

WORLD_SIZE = 4
MAX_EXAMPLES = 12  # per world size: 4 x 12 random cases per transport keeps the suite near a minute here
SUITE_TIMEOUT_S = 150  # the suites take ~15 s here; a hang (e.g. mismatched splits) fails in time
MPI_MAIN = Path(__file__).with_name("mpi_main.py")
TRANSPORTS = ["gloo", "mpi"]


def gloo_worker(max_examples: int) -> dict:
    world = TorchTransport.from_mesh(init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("fssdp",)), "fssdp")
    groups = {size: dist.new_group(list(range(size))) for size in range(1, world.world_size)}

    def transport_of_size(size: int):
        if world.rank >= size:
            return None
        return world if size == world.world_size else TorchTransport(groups[size])

    return run_all(world, transport_of_size, dist.barrier, max_examples)


@pytest.fixture(scope="module")
def gloo_reports() -> list[dict]:
    return run_workers(gloo_worker, WORLD_SIZE, MAX_EXAMPLES, timeout_s=SUITE_TIMEOUT_S)


@pytest.fixture(scope="module")
def mpi_reports(tmp_path_factory) -> list[dict]:
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev"
    assert importlib.util.find_spec("mpi4py"), "mpi4py not installed: pip install mpi4py"
    out = tmp_path_factory.mktemp("mpi")
    command = [
        mpirun,
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        str(WORLD_SIZE),
        sys.executable,
        str(MPI_MAIN),
        str(out),
        str(MAX_EXAMPLES),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as mpi:
        try:
            output, _ = mpi.communicate(timeout=SUITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            mpi.terminate()  # mpirun forwards SIGTERM to its ranks; a SIGKILL would orphan them
            output, _ = mpi.communicate()
            pytest.fail(f"mpirun did not finish in {SUITE_TIMEOUT_S} s:\n{output}")
    assert mpi.returncode == 0, f"mpirun failed ({mpi.returncode}):\n{output}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.fixture(params=TRANSPORTS)
def reports(request) -> list[dict]:
    return request.getfixturevalue(f"{request.param}_reports")


def check_report(reports: list[dict], name: str, ranks: range) -> list[dict]:
    """The named check's report on each rank that ran it; fails with the worker's traceback if it raised."""
    found = []
    for rank in ranks:
        report = reports[rank][name]
        assert "error" not in report, f"{name} failed on rank {rank}:\n{report['error']}"
        found.append(report)
    return found


@pytest.mark.parametrize("size", range(1, WORLD_SIZE + 1))
def test_sparse_collectives_match_dense_reference(reports, size):
    for report in check_report(reports, f"properties_{size}", range(size)):
        assert report["examples"] == MAX_EXAMPLES


@pytest.mark.parametrize("size", range(1, WORLD_SIZE + 1))
def test_primitives_match_their_definition_and_count_bytes(reports, size):
    check_report(reports, f"primitives_{size}", range(size))


@pytest.mark.parametrize("size", range(1, WORLD_SIZE + 1))
def test_autograd_all_to_all_gradients_match_dense_reference(reports, size):
    check_report(reports, f"autograd_{size}", range(size))


def test_operations_in_flight_during_computation_give_synchronous_results(reports):
    check_report(reports, "async", range(WORLD_SIZE))


EXPECTED_ERRORS = {
    "not_surjective": "owner placement is not surjective: chunks [0] have no owner",
    "not_subset": "not a subset of the materialized placement",
    "rank_out_of_range": "chunk 0 is placed on device 4, outside the ranks 0..3",
    "world_mismatch": "placements are over 5 devices but the transport has 4 ranks",
    "spec_count": "got 1 chunk specs for 8 chunks",
    "shape_on_rank_1": "sparse_all_gather: rank(s) [1] passed local chunks that do not match",
    "dtype_on_rank_1": "sparse_all_gather: rank(s) [1] passed local chunks that do not match",
    "missing_on_rank_1": "sparse_all_gather: rank(s) [1] passed local chunks that do not match",
    "reduce_shape_on_rank_1": "sparse_reduce_scatter: rank(s) [1] passed local chunks that do not match",
    "ranks_disagree": "sparse_all_gather: ranks compiled different plans",
    "healthy_after_errors": "ok",
}
RANK_1_DETAIL = {
    "shape_on_rank_1": "chunk 1 is (5,) float32 but its spec says (4,) float32",
    "dtype_on_rank_1": "chunk 1 is (4,) float16 but its spec says (4,) float32",
    "missing_on_rank_1": "the placement puts chunks [1, 5] here, but got chunks []",
    "reduce_shape_on_rank_1": "chunk 1 is (2, 2) float32 but its spec says (4,) float32",
}


def test_precondition_errors_raise_clear_messages_on_every_rank(reports):
    for rank, messages in enumerate(check_report(reports, "errors", range(WORLD_SIZE))):
        for label, expected in EXPECTED_ERRORS.items():
            assert expected in messages[label], f"rank {rank}, {label}: {messages[label]}"
        for label, detail in RANK_1_DETAIL.items():
            assert (detail in messages[label]) == (rank == 1), f"rank {rank}, {label}: {messages[label]}"
