"""Atomic, resumable checkpoints in ``RUN_DIR/checkpoints/step_XXXXXXXX``.

Tensors (model, optimizer, RNG) go through ``torch.distributed.checkpoint`` so that the same format
extends to sharded, re-shardable saves; the small trainer state (step, data position, model config) is JSON.
A checkpoint is written into a hidden temporary folder, completed with a ``COMPLETE`` marker written last,
then renamed into place: a reader never sees a half-written checkpoint, and an interrupted save leaves
only a temporary folder that is ignored (and cleaned up by the next save).
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hecate.collectives.errors import CheckpointError
from hecate.parallel.parallelize import Parallel

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first. Incomplete ones are skipped with a warning."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob(PREFIX + "*")):
        if (path / COMPLETE).is_file():
            found.append(path)
        else:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int, parallel: Parallel | None = None) -> Path:
    """Write the checkpoint taken after ``step`` optimizer steps, then keep only the newest ``keep``.
    Collective: every rank writes its share; rank 0 alone completes, renames and prunes."""
    parallel = parallel if parallel is not None else Parallel.single()
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if parallel.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(_tensors(model, optimizer, parallel), checkpoint_id=tmp)
    if parallel.is_main:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # a re-run of the same step (e.g. after a resume): the new one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: Parallel) -> dict[str, Any]:
    """What DCP saves and loads: model, optimizer state (expert tensors as sharded DTensors) and the RNG."""
    if optimizer is None:
        return {"model": model.state_dict(), "rng": torch.get_rng_state()}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = parallel.to_checkpoint(model, {"model": model_sd, "optim": optim_sd})
    return {**state, "rng": torch.get_rng_state()}


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_FILE}: {err}") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    expect: dict[str, Any], parallel: Parallel | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) in place; returns the trainer state.

    ``expect`` holds trainer-state entries that must match (e.g. the model config): a checkpoint of another
    model is rejected with the differing fields named, before any tensor is read.
    """
    state = read_trainer_state(path)
    for key, wanted in expect.items():
        saved = state.get(key)
        if saved != wanted:
            diffs = _differences(saved, wanted, key)
            raise CheckpointError(f"checkpoint {path} was written for another {key}: {diffs}")
    parallel = parallel if parallel is not None else Parallel.single()
    to_load = _tensors(model, optimizer, parallel)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(to_load, checkpoint_id=path)
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from None
    if optimizer is not None:
        to_load = {**parallel.from_checkpoint(model, to_load), "rng": to_load["rng"]}
        set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    else:
        model.load_state_dict(to_load["model"])
    torch.set_rng_state(to_load["rng"])
    return state


def _differences(saved: Any, wanted: Any, prefix: str) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(set(saved) | set(wanted))
        return ", ".join(f"{prefix}.{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}"
                         for k in keys if saved.get(k) != wanted.get(k))
    return f"saved {saved!r}, now {wanted!r}"
