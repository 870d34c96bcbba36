"""``hecate train CONFIG --launcher ray --address ADDR --workers N``: submit the job to an existing Ray cluster.

Two halves:

- :func:`submit` (on the user's machine) sends ``python -m hecate.launch.ray_job ...`` to the cluster through the
  Job Submission API (``ADDR`` is the dashboard, e.g. ``http://HEAD:8265``), streams the job's log back, and
  fails with it when the job fails. Ctrl-C stops the job.
- :func:`main` (the job's driver, on the cluster) reserves one bundle per worker in a placement group (``pack``:
  as few nodes as possible; ``spread``: as many), starts one actor per bundle, lets rank 0 publish its node's
  address and a free port as MASTER_ADDR/MASTER_PORT, and runs the ordinary worker in every actor with the
  torchrun-style variables set (:mod:`hecate.launch.environment`). The first actor that fails fails the job with
  its rank and traceback; the others are killed. With ``--max-restarts N`` the driver instead starts a fresh set
  of actors (up to N times) with ``TORCHELASTIC_RESTART_COUNT`` set, as torchrun does, so that the workers resume
  from the last complete checkpoint.

The run folder is written where the workers run: the cluster must share the filesystem the paths name (as a
SLURM cluster does), and ``python`` on the cluster is this one (``sys.executable``) unless ``--python`` says.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
from typing import Any

from hecate.collectives.errors import HecateError
from hecate.trainer.faults import ENV as FAULT_ENV
from hecate.trainer.faults import RESTART_ENV

STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}
POLL_S = 1.0
PLACEMENT_TIMEOUT_S = 120.0  # a placement group that cannot be placed (too few CPUs/GPUs) fails after this


# ---- on the user's machine ------------------------------------------------------------------------------------

def submit(address: str, workers: int, worker_args: list[str], *, gpus_per_worker: float = 0.0,
           cpus_per_worker: float = 1.0, placement: str = "pack", python: str | None = None,
           max_restarts: int = 0) -> None:
    """Submit, stream the log until the job ends; raises HecateError when it cannot be submitted or fails."""
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise HecateError("--launcher ray needs Ray: pip install -e '.[ray]' (ray[default])") from None
    driver = [python or sys.executable, "-m", "hecate.launch.ray_job", "--workers", str(workers),
              "--cpus-per-worker", str(cpus_per_worker), "--gpus-per-worker", str(gpus_per_worker),
              "--placement", placement, "--max-restarts", str(max_restarts), "--", *worker_args]
    entrypoint = f"cd {shlex.quote(os.getcwd())} && {shlex.join(driver)}"
    env_vars = {name: os.environ[name] for name in (FAULT_ENV, "PYTHONPATH") if name in os.environ}
    try:
        client = JobSubmissionClient(address)
        job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars} if env_vars else None)
    except Exception as err:  # ConnectionError, RuntimeError, ValueError from the client: all mean "cannot submit"
        raise HecateError(f"--launcher ray: cannot submit to the Ray cluster at {address!r} (pass its dashboard "
                          f"address, e.g. http://HEAD:8265): {str(err).splitlines()[0] if str(err) else err!r}") from None
    print(f"hecate: submitted Ray job {job} to {address}", file=sys.stderr, flush=True)
    shown = 0
    try:
        while True:
            status = client.get_job_status(job)
            logs = client.get_job_logs(job)
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
            if status.is_terminal():
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        client.stop_job(job)
        raise
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job)
        raise HecateError(f"Ray job {job} {status.value.lower()}: {info.message or ''} (its log is above)")


# ---- the job's driver, on the cluster --------------------------------------------------------------------------

class WorkerActor:
    """One rank: runs the ordinary worker with the variables torchrun would set."""

    def node_address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:  # a port free on this node for rank 0's store
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, environ: dict[str, str], worker_args: list[str]) -> dict[str, Any]:
        from hecate.launch.worker import parse_args, run_from_environment
        from hecate.trainer.config import load_config

        os.environ.update(environ)
        args = parse_args(worker_args)
        return run_from_environment(load_config(args.config, args.override).to_dict(), args.resume)


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    parser = argparse.ArgumentParser(prog="python -m hecate.launch.ray_job")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--placement", choices=sorted(STRATEGIES), default="pack")
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args

    ray.init(address="auto", log_to_driver=True)
    bundle = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})
    group = placement_group([dict(bundle) for _ in range(args.workers)], strategy=STRATEGIES[args.placement])
    actors = []
    try:
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            print(f"hecate: error: the cluster cannot place {args.workers} workers of {bundle} "
                  f"({args.placement}) within {PLACEMENT_TIMEOUT_S:.0f} s: {ray.cluster_resources()}",
                  file=sys.stderr)
            return 2
        for attempt in range(args.max_restarts + 1):
            actors = start_actors(group, args.workers, bundle)
            failed = run_attempt(actors, worker_args, attempt)
            if failed is None:
                print(f"hecate: {args.workers} Ray workers finished", flush=True)
                return 0
            rank, err = failed
            print(f"hecate: error: rank {rank} of {args.workers} failed:\n{err}", file=sys.stderr, flush=True)
            kill_actors(actors)
            if attempt < args.max_restarts:
                print(f"hecate: restarting the workers ({attempt + 1} of {args.max_restarts}); they resume from the "
                      f"last complete checkpoint", file=sys.stderr, flush=True)
        return 1
    finally:
        kill_actors(actors)
        remove_placement_group(group)


def start_actors(group, workers: int, bundle: dict[str, float]) -> list:
    """One actor per bundle of the placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(WorkerActor)
    return [remote.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                           scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
            for i in range(workers)]


def run_attempt(actors: list, worker_args: list[str], attempt: int) -> tuple[int, Exception] | None:
    """Run the worker in every actor; None when all finish, else (rank, error) of the first that failed."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    addresses = ray.get([a.node_address.remote() for a in actors])
    master_addr, master_port = addresses[0]  # rank 0 publishes its node and a free port there
    nodes = [ip for ip, _ in addresses]
    runs = {}
    for rank, actor in enumerate(actors):
        environ = {"RANK": str(rank), "WORLD_SIZE": str(len(actors)),
                   "LOCAL_RANK": str(nodes[:rank].count(nodes[rank])),
                   "LOCAL_WORLD_SIZE": str(nodes.count(nodes[rank])),
                   "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), RESTART_ENV: str(attempt)}
        runs[actor.run.remote(environ, worker_args)] = rank
    pending = list(runs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except (RayTaskError, RayActorError) as err:
            return runs[done[0]], err
    return None


def kill_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


if __name__ == "__main__":
    sys.exit(main())
