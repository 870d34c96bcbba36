"""The one worker entry point. Every launch mode ends here: the simulated cluster calls :func:`train_worker`
in processes it started, and torchrun / mpirun / srun / the Ray launcher's actors start
``python -m hecate.launch.worker CONFIG``, which finds its place from the environment they set
(:mod:`hecate.launch.environment`), joins the process group and calls the same function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hecate.collectives.errors import HecateError
from hecate.collectives.heartbeat import RUN_SUBFOLDER, Heartbeat
from hecate.collectives.host_staged import HOST_STAGED
from hecate.collectives.timeline import Timeline
from hecate.launch.environment import LaunchError, WorkerEnv, detect, store_listener, usable_cores
from hecate.launch.hangs import CollectiveTimeout, never_arrived, waiting_in
from hecate.launch.parent_watch import watch_parent
from hecate.launch.simulate import SIMULATED_ENV, network_from_environment
from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import config_from_dict, load_config
from hecate.trainer.device import ranks_per_gpu, select_device
from hecate.trainer.faults import RESTART_ENV
from hecate.trainer.log import setup_logging
from hecate.trainer.plan import layout_of
from hecate.trainer.train import Trainer

log = logging.getLogger("hecate")


def train_worker(
    cfg_dict: dict[str, Any], resume: bool, env: WorkerEnv | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Train as one rank of an initialised default process group, on ``device`` (the CPU when omitted); returns
    the run summary."""
    cfg = config_from_dict(cfg_dict)
    rank = dist.get_rank()
    setup_logging(None, rank=rank, level=cfg.logging.level)
    parallel = Parallel.from_world(
        layout_of(cfg, dist.get_world_size()),
        cfg.parallel,
        cfg.moe,
        cfg.fssdp,
        transport=cfg.collectives.transport,
        network=network_from_environment(),
        timeline=Timeline(rank) if cfg.logging.profile_step else None,
        device=device,
    )
    trainer = Trainer(cfg, resume=resume, parallel=parallel)
    setup_logging(trainer.run_dir, rank=rank, level=cfg.logging.level)
    log.info(
        "rank %d of %d (pid %d) on cores %s with %d threads, device %s; run folder %s; %s",
        rank,
        dist.get_world_size(),
        os.getpid(),
        usable_cores(),
        torch.get_num_threads(),
        parallel.device,
        trainer.run_dir,
        trainer.describe(),
    )
    if env is not None:
        log.info("started by %s", env.describe())
    log.info("MoE collectives over %s", type(parallel.ep).__name__)
    beats = trainer.run_dir / RUN_SUBFOLDER
    heartbeat = Heartbeat(beats, rank, restart_count(), lambda: trainer.step + 1).start()
    try:
        return trainer.run()
    except RuntimeError as err:
        where = waiting_in(err, trainer.model)
        if where is None:
            raise
        laggards = never_arrived(beats, dist.get_world_size(), rank, restart_count())
        message = (
            f"rank {rank} of {dist.get_world_size()}: collective failed in step {trainer.step + 1} after "
            f"waiting in {where}: {str(err).splitlines()[0]} (train.collective_timeout_s="
            f"{cfg.train.collective_timeout_s:g})" + (f"; never arrived: {laggards}" if laggards else "")
        )
        log.error("%s", message)
        raise CollectiveTimeout(message) from err
    finally:
        heartbeat.stop()


def process_group_backend(device: torch.device, local_world_size: int) -> str:
    """gloo on the CPU; on CUDA, NCCL for CUDA tensors (gradients, TP, PP, the MoE all-to-alls) and gloo for host
    tensors (agreements on host integers, the asynchronous checkpoint's group). Ranks that share one GPU (the
    simulated mode) cannot form NCCL communicators there - NCCL refuses two ranks of one communicator on one
    device - so they exchange through host memory over gloo (:mod:`hecate.collectives.host_staged`)."""
    if device.type != "cuda":
        return "gloo"
    if ranks_per_gpu(local_world_size, simulated=True) > 1:
        return HOST_STAGED
    return "cpu:gloo,cuda:nccl"


def init_distributed(env: WorkerEnv, timeout_s: float, backend: str = "gloo") -> None:
    """Join the job's process group (``backend``, see :func:`process_group_backend`): through torchrun's agent
    store when there is one, else rank 0 hosts a TCPStore at MASTER_ADDR:MASTER_PORT. Every collective then fails
    after ``timeout_s`` instead of hanging."""
    timeout = timedelta(seconds=timeout_s)
    subgroups_time_out_after(timeout)
    try:
        if env.agent_store:  # a client of the launcher's store; torchrun keeps that store across restarts, so
            # each attempt writes under its own prefix, never reading an earlier attempt's addresses (pytorch#135712)
            agent = dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout=timeout)
            store = dist.PrefixStore(f"hecate/attempt_{restart_count()}", agent)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
            return
        listener = store_listener(env.master_addr, env.master_port)[1] if env.rank == 0 else {}
        store = dist.TCPStore(
            env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout=timeout, **listener
        )
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except (RuntimeError, OSError) as err:  # DistStoreError, DistNetworkError; TimeoutError, a busy port
        raise LaunchError(
            f"rank {env.rank} of {env.world_size} ({env.launcher}) could not join the job at "
            f"{env.master_addr}:{env.master_port} within train.collective_timeout_s={timeout_s:g} s "
            f"(a node that never joined, or a wrong MASTER_ADDR/MASTER_PORT): "
            f"{str(err).splitlines()[0]}"
        ) from err


def subgroups_time_out_after(timeout: timedelta) -> None:
    """Make every process group created later (DeviceMesh dimensions, a checkpointer's own group) give up after
    ``timeout`` too. ``new_group`` without a ``timeout`` takes torch's default (30 minutes for gloo), not the
    world group's, so a rank that stalls while its peers wait in an expert or data-parallel subgroup would hold
    the job for half an hour; torch reads that default from this module variable when a group is created."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout


def set_threads(env: WorkerEnv) -> None:
    """Share the node's cores among its workers (as ``--simulate`` does), no more threads than the cores this
    worker may use (a launcher that binds ranks to cores), unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        share = (os.cpu_count() or 1) // env.local_world_size
        torch.set_num_threads(max(1, min(share, len(usable_cores()))))


def run_from_environment(cfg_dict: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Find this worker's place, join the group, train, leave: the body of every launched worker. A restarted
    attempt (torchrun ``--max-restarts``, the Ray launcher's ``--max-restarts``) resumes from the last complete
    checkpoint by itself."""
    cfg = config_from_dict(cfg_dict)
    resume = resume or restart_count() > 0
    env = detect()
    watch_parent(f"rank {env.rank} of {env.world_size} ({env.launcher})")
    set_threads(env)
    simulated = os.environ.get(SIMULATED_ENV) == "1"
    device = select_device(cfg.train.device, env.local_rank, env.local_world_size, simulated)
    init_distributed(env, cfg.train.collective_timeout_s, process_group_backend(device, env.local_world_size))
    try:
        return train_worker(cfg_dict, resume, env, device)
    finally:
        dist.destroy_process_group()


def restart_count() -> int:
    """How many times the launcher restarted this job (torchrun's variable; the Ray launcher sets it too)."""
    return int(os.environ.get(RESTART_ENV, "0") or 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hecate.launch.worker")
    parser.add_argument("config")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # appended by DeepSpeed's launcher; LOCAL_RANK carries the same
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m hecate.launch.worker CONFIG [-o KEY=VALUE ...] [--resume]`` under torchrun, mpirun, srun (or
    any launcher :mod:`hecate.launch.environment` knows). Exits 2 with one line on a user error (bad config,
    inconsistent launcher variables, a collective that timed out); 1 with a traceback on anything else."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
        run_from_environment(cfg.to_dict(), args.resume)
    except HecateError as err:
        if args.debug:
            raise
        print(f"hecate worker: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
