"""The one worker entry point. Every launch mode ends here: the simulated cluster calls :func:`train_worker`
in processes it started, and torchrun / mpirun / srun start ``python -m hecate.launch.worker CONFIG``, which
joins the process group from the environment they set and calls the same function.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import config_from_dict, load_config
from hecate.trainer.log import setup_logging
from hecate.trainer.plan import layout_of
from hecate.trainer.train import Trainer

log = logging.getLogger("hecate")


def train_worker(cfg_dict: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Train as one rank of an initialised default process group; returns the run summary."""
    cfg = config_from_dict(cfg_dict)
    rank = dist.get_rank()
    setup_logging(None, rank=rank, level=cfg.logging.level)
    layout_of(cfg, dist.get_world_size())
    parallel = Parallel.from_world(cfg.parallel, cfg.moe.num_experts, cfg.model.n_layers, cfg.model.n_heads,
                                   cfg.fssdp)
    trainer = Trainer(cfg, resume=resume, parallel=parallel)
    setup_logging(trainer.run_dir, rank=rank, level=cfg.logging.level)
    log.info("rank %d of %d (pid %d); run folder %s; %s", rank, dist.get_world_size(), os.getpid(), trainer.run_dir,
             trainer.describe())
    return trainer.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m hecate.launch.worker CONFIG [-o KEY=VALUE ...] [--resume]`` under a launcher that sets
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does)."""
    parser = argparse.ArgumentParser(prog="python -m hecate.launch.worker")
    parser.add_argument("config")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    dist.init_process_group("gloo")
    try:
        train_worker(cfg.to_dict(), args.resume)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
