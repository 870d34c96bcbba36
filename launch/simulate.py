"""The simulated cluster's process core: N real processes on this machine that form one process group.

Tests and ``hecate train --simulate N`` share it. The parent hosts the job's TCPStore (on a port the OS picks,
so two jobs never race for one) and every worker gets the environment torchrun would give it, with
``TORCHELASTIC_USE_AGENT_STORE=True`` so that ``init_process_group("env://")`` connects to the parent's store.
Workers report on a pipe; the parent watches pipes and process sentinels together, so a worker that raises
or dies takes the job down at once with its rank and reason, and nothing is left running.

With ``bind_cores`` each worker runs on cores of its own, as ``mpirun --bind-to core`` places ranks: left free,
the kernel moves ranks between cores and lets one run ahead of another that shares its core, and the ranks that
finish a phase first wait in the next collective for the others - waiting that a single-rank-per-device cluster
does not have.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hecate.collectives.errors import HecateError
from hecate.collectives.simulated_network import SimulatedNetwork
from hecate.launch.environment import loopback_interface, store_listener, usable_cores
from hecate.launch.errors import WorkerFailure

T = TypeVar("T")

MASTER_ADDR = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # prctl option from <linux/prctl.h>
STOP_GRACE_S = 10.0  # SIGTERM first; whoever is still alive after this is SIGKILLed
STACK_DUMP_WAIT_S = 1.0  # time given to hung workers to write their Python stacks before they are stopped
ROOT_CAUSE_WAIT_S = 2.0  # after a rank raises, how long to look for a peer whose death caused it

SIMULATED_ENV = "HECATE_SIMULATED"  # "1" in workers of --simulate: ranks may share one GPU
SIM_NETWORK_ENV = "HECATE_SIM_NETWORK"  # "nodes,gbps,latency_us" for the workers of a simulated network

__all__ = [
    "WorkerFailure",
    "WorkerGroup",
    "core_sets",
    "network_environment",
    "network_from_environment",
    "run_workers",
    "start_workers",
    "worker_environment",
]


def worker_environment(rank: int, world_size: int, master_port: int) -> dict[str, str]:
    """The variables a worker reads to find its place in a single-node job (the same names torchrun sets), and
    ``GLOO_SOCKET_IFNAME`` so that gloo's listeners stay on loopback like the store."""
    return {
        "GLOO_SOCKET_IFNAME": loopback_interface(),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        SIMULATED_ENV: "1",
    }


def network_environment(network: SimulatedNetwork) -> dict[str, str]:
    """How ``--sim-nodes`` reaches the workers: one variable, read back by :func:`network_from_environment`."""
    return {SIM_NETWORK_ENV: f"{network.nodes},{network.inter_node_gbps!r},{network.latency_us!r}"}


def network_from_environment() -> SimulatedNetwork | None:
    value = os.environ.get(SIM_NETWORK_ENV)
    if not value:
        return None
    nodes, gbps, latency_us = value.split(",")
    return SimulatedNetwork(int(nodes), float(gbps), float(latency_us))


def core_sets(world_size: int, cores: list[int]) -> list[list[int]]:
    """The cores each rank is bound to: an equal block of ``cores`` each when there are enough of them, else one
    core each, dealt round-robin (rank r on ``cores[r % len(cores)]``)."""
    per_rank = len(cores) // world_size
    if per_rank >= 1:
        return [cores[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    return [[cores[r % len(cores)]] for r in range(world_size)]


def _bind(cores: list[int]) -> None:
    """Bind every thread of this process to ``cores``; threads started later inherit it from their starter."""
    for thread_id in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread_id), cores)


def _worker_main(conn, fn, args, environ, threads, backend, stack_path, cores) -> None:
    """Body of one worker process: set up, run ``fn``, report ``("ok", value)`` or ``("error", traceback)`` (one
    line for a :class:`HecateError`)."""
    _die_with_parent()
    if cores is not None:
        _bind(cores)
    os.environ.update(environ)
    with open(stack_path, "w") as stack_file:
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        torch.set_num_threads(threads)
        try:
            if backend is not None:
                dist.init_process_group(backend)
            value = fn(*args)
            if backend is not None:
                dist.destroy_process_group()
            _report(conn, ("ok", value))
        except HecateError as err:  # a user error (bad input): one line naming its cause, as the launchers print
            _report(conn, ("error", f"{type(err).__name__}: {err}"))
        except BaseException:
            _report(conn, ("error", traceback.format_exc()))
        finally:
            conn.close()


def _report(conn, message: tuple[str, Any]) -> None:
    """Send by value: the pipe's own pickler would share tensors through file descriptors that vanish with this
    process, which may exit before the parent reads."""
    conn.send_bytes(pickle.dumps(message))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker if the launcher dies, so no orphan waits in a collective."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _exit_reason(process: mp.process.BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by signal {signal.Signals(-code).name} ({-code})"
    return f"exited with code {code} before returning a result"


class WorkerGroup:
    """Running workers, the pipes they report on, and the store they rendezvous at."""

    def __init__(self, processes: list, conns: list, store: dist.TCPStore | None, stack_dir: str):
        self.processes = processes
        self.conns = conns
        self.store = store
        self.stack_dir = stack_dir

    @property
    def world_size(self) -> int:
        return len(self.processes)

    def join(self, timeout_s: float) -> list[Any]:
        """Wait for every worker's result (ordered by rank); on any failure stop all and raise WorkerFailure."""
        try:
            results = self._collect(time.monotonic() + timeout_s, timeout_s)
            deadline = time.monotonic() + STOP_GRACE_S
            for process in self.processes:  # let them exit on their own: a terminated one leaks its semaphores
                process.join(max(0.0, deadline - time.monotonic()))
            return results
        finally:
            self.stop()

    def _collect(self, deadline: float, timeout_s: float) -> list[Any]:
        results: dict[int, Any] = {}
        pending = set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout_failure(sorted(pending), timeout_s)
            waitables = {self.conns[r]: r for r in pending} | {self.processes[r].sentinel: r for r in pending}
            for ready in mp.connection.wait(list(waitables), timeout=remaining):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                status, value = self._receive(rank)
                if status == "error":
                    cause = f"raised:\n{value}" if "\n" in value.strip() else f"raised {value}"
                    raise self._root_cause(pending - {rank}) or self._failure(rank, cause)
                if status == "died":
                    raise self._failure(rank, _exit_reason(self.processes[rank]))
                results[rank] = value
                pending.discard(rank)
        return [results[r] for r in range(self.world_size)]

    def _root_cause(self, others: set[int]) -> WorkerFailure | None:
        """A rank that raised may only have lost a peer: when another rank dies within a moment, that death is
        the cause worth reporting (its peers' collectives fail first because they notice it first)."""
        deadline = time.monotonic() + ROOT_CAUSE_WAIT_S
        while time.monotonic() < deadline:
            for rank in sorted(others):
                if not self.processes[rank].is_alive() and not self.conns[rank].poll():
                    return self._failure(rank, _exit_reason(self.processes[rank]))
            time.sleep(0.05)
        return None

    def _receive(self, rank: int) -> tuple[str, Any]:
        """The worker's report, or ``("died", None)`` when its pipe closed or its process ended without one."""
        conn = self.conns[rank]
        if conn.poll():
            try:
                return pickle.loads(conn.recv_bytes())
            except EOFError:
                pass
        self.processes[rank].join(STOP_GRACE_S)
        return "died", None

    def _failure(self, rank: int, reason: str) -> WorkerFailure:
        return WorkerFailure(f"rank {rank} of {self.world_size} {reason}", (rank,))

    def _timeout_failure(self, ranks: list[int], timeout_s: float) -> WorkerFailure:
        stacks = self._stacks(ranks)
        return WorkerFailure(
            f"timed out after {timeout_s:.1f} s; ranks {ranks} of {self.world_size} had not finished."
            f" Their Python stacks:\n{stacks}",
            tuple(ranks),
        )

    def _stacks(self, ranks: list[int]) -> str:
        """Ask hung workers (SIGUSR1 -> faulthandler) where they are, so the timeout names the collective."""
        for rank in ranks:
            if self.processes[rank].is_alive():
                os.kill(self.processes[rank].pid, signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT_S)
        parts = []
        for rank in ranks:
            path = self._stack_path(rank)
            stack = open(path).read().strip() if os.path.exists(path) else ""
            parts.append(f"--- rank {rank} ---\n{stack or '(no stack written: still starting?)'}")
        return "\n".join(parts)

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self.stack_dir, f"rank{rank}.stacks")

    def stop(self) -> None:
        """Terminate whoever is still running (SIGKILL after STOP_GRACE_S) and release pipes, store and files."""
        alive = [p for p in self.processes if p.is_alive()]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        self.store = None
        shutil.rmtree(self.stack_dir, ignore_errors=True)


def start_workers(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    env: dict[str, str] | None = None,
    threads_per_worker: int = 1,
    backend: str | None = "gloo",
    bind_cores: bool = False,
) -> WorkerGroup:
    """Start ``world_size`` spawned workers running ``fn(*args)``; ``backend=None`` leaves process-group set-up
    to ``fn`` (a trainer entry point that calls ``init_process_group`` itself, as under torchrun);
    ``bind_cores`` binds rank r to ``core_sets(world_size, cores this process may use)[r]``."""
    if world_size < 1:
        raise HecateError(f"world_size must be at least 1, got {world_size}")
    if bind_cores and not hasattr(os, "sched_setaffinity"):
        raise HecateError(f"binding workers to cores needs os.sched_setaffinity (Linux); {sys.platform} has none")
    cores = core_sets(world_size, usable_cores()) if bind_cores else [None] * world_size
    try:
        pickle.dumps((fn, args))
    except Exception as e:
        raise HecateError(
            f"workers need a picklable function defined at module level and picklable arguments: {e}"
        ) from e
    port, listener = store_listener(MASTER_ADDR, 0)
    store = dist.TCPStore(MASTER_ADDR, port, None, True, timedelta(seconds=60), wait_for_workers=False, **listener)
    stack_dir = tempfile.mkdtemp(prefix="hecate-workers-")
    context = mp.get_context("spawn")
    group = WorkerGroup([], [], store, stack_dir)
    try:
        for rank in range(world_size):
            parent_conn, child_conn = context.Pipe(duplex=False)
            environ = worker_environment(rank, world_size, store.port) | (env or {})
            process = context.Process(
                target=_worker_main,
                args=(child_conn, fn, args, environ, threads_per_worker, backend, group._stack_path(rank), cores[rank]),
                name=f"hecate-worker-{rank}",
            )
            process.start()
            child_conn.close()
            group.processes.append(process)
            group.conns.append(parent_conn)
    except BaseException:
        group.stop()
        raise
    return group


def run_workers(
    fn: Callable[..., T],
    world_size: int,
    *args: Any,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    threads_per_worker: int = 1,
    bind_cores: bool = False,
) -> list[T]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes joined in one gloo group; return results by rank."""
    group = start_workers(fn, world_size, args, env=env, threads_per_worker=threads_per_worker, bind_cores=bind_cores)
    return group.join(timeout_s)
