"""The simulated cluster's process core: results by rank, and failures that name the rank and leave nothing."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hecate.collectives.errors import HecateError
from hecate.launch.environment import usable_cores
from hecate.launch.errors import WorkerFailure
from hecate.launch.simulate import STOP_GRACE_S, core_sets, run_workers, start_workers
from hecate.parallel.errors import CheckpointError

pytestmark = pytest.mark.slow  # starts processes

# Spawning workers and importing torch takes a few seconds each on a loaded 2-core machine; a failure must
# still be reported well before the other workers' collectives would time out on their own.
FAILURE_REPORTED_WITHIN_S = 30.0 + STOP_GRACE_S


def _describe_rank() -> dict:
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "HECATE_TEST_EXTRA")
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "env": {name: os.environ[name] for name in names},
        "threads": torch.get_num_threads(),
        "total": total.item(),
    }


def _record_pid_then(pid_dir: str, failing_rank: int, how: str) -> None:
    """Every rank leaves its pid; one rank fails as told, the others wait in a collective that never ends."""
    rank = dist.get_rank()
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    dist.barrier()
    if rank != failing_rank:
        dist.barrier()
    elif how == "raise":
        raise ValueError(f"rank {rank} failed on purpose")
    elif how == "user-error":
        raise CheckpointError(f"rank {rank} found a truncated checkpoint")
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)


def _init_from_environment() -> float:
    """What a trainer entry point does under torchrun: form the group from the environment itself."""
    dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    dist.destroy_process_group()
    return total.item()


def _cores_of_every_thread() -> list[list[int]]:
    """The cores of each of this worker's threads (gloo's among them), then those of a thread started now."""
    later = []
    thread = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
    thread.start()
    thread.join()
    dist.barrier()
    return [sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")] + later


def _sleep_forever_on_rank_1() -> str:
    if dist.get_rank() == 1:
        time.sleep(3600)
    return "done"


def _assert_all_gone(pid_dir: Path, world_size: int) -> None:
    pids = [int(path.read_text()) for path in sorted(pid_dir.glob("*.pid"))]
    assert len(pids) == world_size
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_results_come_back_ordered_by_rank_with_torchrun_environment():
    results = run_workers(_describe_rank, 3, env={"HECATE_TEST_EXTRA": "x"}, timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for rank, result in enumerate(results):
        assert result["world_size"] == 3
        assert result["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "3",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "3",
            "MASTER_ADDR": "127.0.0.1",
            "HECATE_TEST_EXTRA": "x",
        }
        assert result["threads"] == 1
        assert result["total"] == 6.0


def _listening_on_master_port() -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* shows them) listening on MASTER_PORT."""
    port = f"{int(os.environ['MASTER_PORT']):04X}"
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(f":{port}"):
                found.append(local.split(":")[0])
    return found


def test_the_job_store_listens_on_loopback_only():
    """The services the tests start stay on loopback: the parent's TCPStore binds 127.0.0.1, not every interface."""
    assert start_workers(_listening_on_master_port, 1, backend=None).join(timeout_s=60) == [["0100007F"]]


def test_workers_can_form_their_own_group_from_the_environment():
    assert start_workers(_init_from_environment, 2, backend=None).join(timeout_s=120) == [2.0, 2.0]


@pytest.mark.parametrize(
    "how, expected",
    [
        ("raise", ["rank 1 of 3 raised", "ValueError: rank 1 failed on purpose", "Traceback", "_record_pid_then"]),
        ("user-error", ["rank 1 of 3 raised CheckpointError: rank 1 found a truncated checkpoint"]),
        ("sigkill", ["rank 1 of 3 was killed by signal SIGKILL (9)"]),
        ("exit", ["rank 1 of 3 exited with code 3"]),
    ],
)
def test_failing_worker_is_named_and_nothing_is_left_running(tmp_path, how, expected):
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as caught:
        run_workers(_record_pid_then, 3, str(tmp_path), 1, how, timeout_s=120)
    assert time.monotonic() - start < FAILURE_REPORTED_WITHIN_S
    for text in expected:
        assert text in str(caught.value)
    if how == "user-error":  # a user error is one line, as the launchers print it; a bug keeps its traceback
        assert "\n" not in str(caught.value)
    assert caught.value.ranks == (1,)
    _assert_all_gone(tmp_path, 3)


def test_timeout_names_unfinished_ranks_and_where_they_wait():
    timeout_s = 15.0
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as caught:
        run_workers(_sleep_forever_on_rank_1, 2, timeout_s=timeout_s)
    assert time.monotonic() - start < timeout_s + FAILURE_REPORTED_WITHIN_S
    message = str(caught.value)
    assert "timed out after 15.0 s; ranks [1] of 2 had not finished" in message
    assert "_sleep_forever_on_rank_1" in message
    assert caught.value.ranks == (1,)


def test_core_sets_give_blocks_of_cores_or_deal_them_round_robin():
    assert core_sets(2, [0, 1, 2, 3, 4, 5, 6, 7]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert core_sets(3, [0, 1, 2, 3, 4, 5, 6, 7]) == [[0, 1], [2, 3], [4, 5]]
    assert core_sets(4, [2, 5]) == [[2], [5], [2], [5]]


@pytest.mark.parametrize("world", [2, 4])
def test_bound_workers_run_every_thread_on_their_own_cores(world):
    bound = run_workers(_cores_of_every_thread, world, timeout_s=120, bind_cores=True)
    for rank, (cores, threads) in enumerate(zip(core_sets(world, usable_cores()), bound)):
        assert len(threads) > 2, "gloo's threads and the one started later should be there"
        assert threads == [cores] * len(threads), f"rank {rank}: threads on {threads}, bound to {cores}"
    free = run_workers(_cores_of_every_thread, 2, timeout_s=120)
    assert all(threads == [usable_cores()] * len(threads) for threads in free), free


def test_function_that_cannot_be_pickled_is_refused_before_any_process_starts():
    with pytest.raises(HecateError, match="module level"):
        run_workers(lambda: None, 2)
