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

The run folder comes back without a shared filesystem: when the attempts end (finished or failed), the driver packs
the run folder of every node of the placement group (each rank writes its own logs and shards where it runs;
``checkpoints/`` stays on the cluster, where a resumed job finds it) into one tar in its node's Ray log folder,
and :func:`submit` downloads it through the dashboard's log API and unpacks it into the local run folder. The
data and config paths must exist on the cluster's nodes (the workers run in this directory's path there), and
``python`` on the cluster is this one (``sys.executable``) unless ``--python`` says.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import socket
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from hecate.collectives.errors import HecateError
from hecate.trainer.faults import ENV as FAULT_ENV
from hecate.trainer.faults import RESTART_ENV

STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}
POLL_S = 1.0
PLACEMENT_TIMEOUT_S = 120.0  # a placement group that cannot be placed (too few CPUs/GPUs) fails after this
FETCH_TIMEOUT_S = 120.0
STAYS_ON_CLUSTER = ("checkpoints",)  # run-folder entries not brought back: large, and used where the job runs


# ---- on the user's machine ------------------------------------------------------------------------------------


def submit(
    address: str,
    workers: int,
    worker_args: list[str],
    run_dir: Path,
    *,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    placement: str = "pack",
    python: str | None = None,
    max_restarts: int = 0,
) -> None:
    """Submit, stream the log until the job ends, bring the run folder back; raises HecateError when the job
    cannot be submitted or fails (after fetching what the workers wrote)."""
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise HecateError("--launcher ray needs Ray: pip install -e '.[ray]' (ray[default])") from None
    job = f"hecate-{uuid.uuid4().hex[:12]}"
    driver = [
        python or sys.executable,
        "-m",
        "hecate.launch.ray_job",
        "--workers",
        str(workers),
        "--cpus-per-worker",
        str(cpus_per_worker),
        "--gpus-per-worker",
        str(gpus_per_worker),
        "--placement",
        placement,
        "--max-restarts",
        str(max_restarts),
        "--run-dir",
        str(run_dir.resolve()),
        "--pack-as",
        packed_name(job),
        "--",
        *worker_args,
    ]
    entrypoint = f"cd {shlex.quote(os.getcwd())} && {shlex.join(driver)}"
    env_vars = {name: os.environ[name] for name in (FAULT_ENV, "PYTHONPATH") if name in os.environ}
    try:
        client = JobSubmissionClient(address)
        client.submit_job(
            entrypoint=entrypoint, submission_id=job, runtime_env={"env_vars": env_vars} if env_vars else None
        )
    except Exception as err:  # ConnectionError, RuntimeError, ValueError from the client: all mean "cannot submit"
        raise HecateError(
            f"--launcher ray: cannot submit to the Ray cluster at {address!r} (pass its dashboard "
            f"address, e.g. http://HEAD:8265): {str(err).splitlines()[0] if str(err) else err!r}"
        ) from None
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
    info = client.get_job_info(job)
    try:
        files = fetch_run_folder(address, info.driver_node_id, packed_name(job), run_dir)
        print(
            f"hecate: {files} files of the run folder came back from the cluster into {run_dir} "
            f"({', '.join(STAYS_ON_CLUSTER)} stays there)",
            file=sys.stderr,
            flush=True,
        )
    except HecateError as err:
        if status == JobStatus.SUCCEEDED:
            raise
        print(f"hecate: {err}", file=sys.stderr, flush=True)  # the job's own failure is the error to report
    if status != JobStatus.SUCCEEDED:
        raise HecateError(f"Ray job {job} {status.value.lower()}: {info.message or ''} (its log is above)")


def packed_name(job: str) -> str:
    """The file, in the driver node's Ray log folder, that holds the job's run folder."""
    return f"{job}-run-folder.tar.b64"


def fetch_run_folder(address: str, node_id: str | None, name: str, run_dir: Path) -> int:
    """Download the packed run folder through the dashboard's log API (``/api/v0/logs/file``) and unpack it into
    ``run_dir``; returns the number of files. Base64, because the log API serves text."""
    if not node_id:
        raise HecateError("the Ray job ended before its driver started: no run folder to bring back")
    query = urllib.parse.urlencode({"node_id": node_id, "filename": name, "lines": -1})
    try:
        with urllib.request.urlopen(
            f"{address.rstrip('/')}/api/v0/logs/file?{query}", timeout=FETCH_TIMEOUT_S
        ) as answer:
            packed = base64.b64decode(answer.read())
    except (OSError, ValueError) as err:
        raise HecateError(
            f"cannot bring the run folder back from the Ray cluster at {address!r} ({name} on node {node_id}): {err}"
        ) from None
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        tar.extractall(run_dir, members=members, filter="data")
    return len(members)


# ---- the job's driver, on the cluster --------------------------------------------------------------------------


class WorkerActor:
    """One rank: runs the ordinary worker with the variables torchrun would set."""

    def node_address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:  # a port free on this node for rank 0's store
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, cwd: str, environ: dict[str, str], worker_args: list[str]) -> dict[str, Any]:
        from hecate.launch.worker import parse_args, run_from_environment
        from hecate.trainer.config import load_config

        os.chdir(cwd)  # the config's relative paths mean what they mean for the driver
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
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--pack-as", required=True, help="file name, in this node's Ray log folder")
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
            print(
                f"hecate: error: the cluster cannot place {args.workers} workers of {bundle} "
                f"({args.placement}) within {PLACEMENT_TIMEOUT_S:.0f} s: {ray.cluster_resources()}",
                file=sys.stderr,
            )
            return 2
        try:
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
                    print(
                        f"hecate: restarting the workers ({attempt + 1} of {args.max_restarts}); they resume from "
                        f"the last complete checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
            return 1
        finally:
            try:
                pack_run_folders(group, args.run_dir, args.pack_as)
            except Exception as err:  # reported; the user's side then says the run folder did not come back
                print(f"hecate: error: cannot pack the run folder {args.run_dir}: {err!r}", file=sys.stderr, flush=True)
    finally:
        kill_actors(actors)
        remove_placement_group(group)


def start_actors(group, workers: int, bundle: dict[str, float]) -> list:
    """One actor per bundle of the placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(WorkerActor)
    return [
        remote.options(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, i),
        ).remote()
        for i in range(workers)
    ]


def run_attempt(actors: list, worker_args: list[str], attempt: int) -> tuple[int, Exception] | None:
    """Run the worker in every actor; None when all finish, else (rank, error) of the first that failed."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    addresses = ray.get([a.node_address.remote() for a in actors])
    master_addr, master_port = addresses[0]  # rank 0 publishes its node and a free port there
    nodes = [ip for ip, _ in addresses]
    runs = {}
    for rank, actor in enumerate(actors):
        environ = {
            "RANK": str(rank),
            "WORLD_SIZE": str(len(actors)),
            "LOCAL_RANK": str(nodes[:rank].count(nodes[rank])),
            "LOCAL_WORLD_SIZE": str(nodes.count(nodes[rank])),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            RESTART_ENV: str(attempt),
        }
        runs[actor.run.remote(os.getcwd(), environ, worker_args)] = rank
    pending = list(runs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except (RayTaskError, RayActorError) as err:
            return runs[done[0]], err
    return None


def pack_run_folders(group, run_dir: Path, name: str) -> None:
    """Merge the run folder of every node the workers ran on into one tar (base64) in this node's Ray log folder,
    where :func:`fetch_run_folder` finds it. A file present on several nodes (a shared filesystem) is taken once."""
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(set(placement_group_table(group)["bundles_to_node_id"].values()))
    pack = ray.remote(num_cpus=0)(pack_run_folder)
    parts = ray.get(
        [
            pack.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(run_dir))
            for node in nodes
        ]
    )
    merged, seen = io.BytesIO(), set()
    with tarfile.open(fileobj=merged, mode="w") as out:
        for part in parts:
            with tarfile.open(fileobj=io.BytesIO(part)) as tar:
                for member in tar.getmembers():
                    if member.name not in seen:
                        seen.add(member.name)
                        out.addfile(member, tar.extractfile(member))
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public accessor for the log folder
    (logs / name).write_bytes(base64.b64encode(merged.getvalue()))
    print(f"hecate: packed {len(seen)} files of {run_dir} from {len(nodes)} node(s)", flush=True)


def pack_run_folder(run_dir: str) -> bytes:
    """This node's files of the run folder as a tar, without what stays on the cluster."""
    packed = io.BytesIO()
    root = Path(run_dir)
    with tarfile.open(fileobj=packed, mode="w") as tar:
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            relative = path.relative_to(root)
            if path.is_file() and not path.is_symlink() and relative.parts[0] not in STAYS_ON_CLUSTER:
                tar.add(path, arcname=str(relative))
    return packed.getvalue()


def kill_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


if __name__ == "__main__":
    sys.exit(main())
