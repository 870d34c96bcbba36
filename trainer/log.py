"""Rank-aware logging: rank 0 talks to the console, every rank writes its own file in the run folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(run_dir: Path | None, rank: int = 0, level: str = "INFO") -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
        file.setFormatter(fmt)
        root.addHandler(file)
