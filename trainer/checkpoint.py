"""Atomic, resumable, re-shardable checkpoints in ``RUN_DIR/checkpoints/step_XXXXXXXX``.

Tensors (model, optimizer, RNG) go through ``torch.distributed.checkpoint`` (DCP): every expert is saved once
with its global shape, so a checkpoint loads into any other layout (world size, EP degree, FSSDP owners); the
small trainer state (step, data position, model config, FSSDP owners and load windows) is JSON.
A checkpoint is written into a hidden temporary folder, completed with a ``COMPLETE`` marker written last,
then renamed into place: a reader never sees a half-written checkpoint, and an interrupted save leaves
only a temporary folder that is ignored (and cleaned up by the next save). With ``checkpoint.async_save``
the tensors are copied in memory and written by a background thread while training goes on; the marker
comes when the write has finished on every rank.

Loading reads nothing it has not checked: the metadata is unpickled with an allowlist of DCP's own data
classes, non-tensor values through ``torch.load(weights_only=True)``, and before any tensor is read the
checkpoint must hold every tensor this model needs, with its shape, every row (expert) of it, and the bytes
its files promise - so a truncated, partial or mismatched checkpoint fails with one error naming what.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
import math
import pickle
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hecate.collectives.errors import CheckpointError
from hecate.parallel.parallelize import Parallel
from hecate.trainer.faults import maybe_inject

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"
METADATA_FILE = ".metadata"  # DCP's index of the checkpoint's tensors and the byte ranges that hold them
MOE_SHAPE_FIELDS = ("num_experts", "ffn_dim", "activation", "every", "shared_expert")

# Without a process group one process is the whole job; DCP says so on every save and load (a background save
# says it from its own thread, after any catch_warnings block has ended).
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")


def model_identity(model_cfg: Any, moe_cfg: Any, vocab_size: int) -> dict[str, Any]:
    """What a checkpoint or an export must match to be loaded into a model: its shape, not how it is trained."""
    moe = dataclasses.asdict(moe_cfg)
    return {"model": dataclasses.asdict(model_cfg), "moe": {k: moe[k] for k in MOE_SHAPE_FIELDS},
            "vocab_size": vocab_size}


def check_identity(saved: dict[str, Any], expect: dict[str, Any], what: str) -> None:
    """Raise naming every differing field when ``saved`` was written for another model than ``expect``."""
    differences = [_differences(saved.get(key), wanted, key) for key, wanted in expect.items()
                   if saved.get(key) != wanted]
    if differences:
        raise CheckpointError(f"{what} was written for another model: {'; '.join(differences)}")


# ---- finding checkpoints ------------------------------------------------------------------------------------

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
    for path in sorted(root.glob(f".tmp-{PREFIX}*")):
        log.warning("ignoring incomplete checkpoint %s (a save that was interrupted or is still running)", path)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


# ---- saving ---------------------------------------------------------------------------------------------------

class Checkpointer:
    """A run's checkpoint writer: one save at a time, synchronous or in the background, newest ``keep`` kept.

    Collective: every rank calls :meth:`save` and :meth:`wait` at the same steps; rank 0 alone completes, renames
    and prunes. A background save talks over its own gloo group, so that it never interleaves with the training
    step's collectives on the default group.
    """

    def __init__(self, root: Path, keep: int, parallel: Parallel | None = None, async_save: bool = False):
        self.root = root
        self.keep = keep
        self.parallel = parallel if parallel is not None else Parallel.single()
        self.async_save = async_save
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: tuple[Future, int] | None = None  # (write in flight, its step)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Write the checkpoint taken after ``step`` optimizer steps (the previous background save finishes
        first). Returns its final path; with ``async_save`` it is complete only after :meth:`wait`."""
        self.wait()
        tmp, final = self._paths(step)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        self.parallel.barrier()
        maybe_inject(self.parallel.rank, step, during="save")
        tensors = _tensors(model, optimizer, self.parallel)
        if self.async_save:
            self._pending = (dcp.async_save(tensors, checkpoint_id=tmp, process_group=self._group,
                                            no_dist=not dist.is_initialized()), step)
            return final
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        self._complete(step)
        return final

    def wait(self) -> None:
        """Finish the background save in flight, if any: its write, then marker, rename and pruning."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        future.result()
        self._complete(step)

    def _paths(self, step: int) -> tuple[Path, Path]:
        """(temporary folder, final folder) of the checkpoint of ``step``."""
        final = self.root / f"{PREFIX}{step:08d}"
        return self.root / f".tmp-{final.name}", final

    def _complete(self, step: int) -> None:
        """Rank 0, once every rank's share is written (DCP's finish step gathers them): marker, rename, prune."""
        tmp, final = self._paths(step)
        if self.parallel.is_main:
            (tmp / COMPLETE).write_text(f"{step}\n")
            if final.exists():  # a re-run of the same step (e.g. after a resume): the new one replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for old in checkpoint_dirs(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.parallel.barrier()


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: Parallel) -> dict[str, Any]:
    """What DCP saves and loads: model, optimizer state (expert tensors in their global shape) and the RNG."""
    if optimizer is None:
        return {"model": model.state_dict(), "rng": torch.get_rng_state()}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = parallel.to_checkpoint(model, {"model": model_sd, "optim": optim_sd})
    return {**state, "rng": torch.get_rng_state()}


# ---- loading --------------------------------------------------------------------------------------------------

def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_FILE}: {err}") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    expect: dict[str, Any], parallel: Parallel | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) in place, from any layout's checkpoint; returns the trainer state.

    ``expect`` holds trainer-state entries that must match (e.g. the model config): a checkpoint of another
    model is rejected with the differing fields named, before any tensor is read.
    """
    state = read_trainer_state(path)
    check_identity(state, expect, f"checkpoint {path}")
    parallel = parallel if parallel is not None else Parallel.single()
    to_load = _tensors(model, optimizer, parallel)
    reader = SafeReader(path)
    check_covers(path, reader.read_metadata(), to_load)
    try:
        dcp.load(to_load, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_cause(err)}") from None
    if optimizer is not None:
        to_load = {**parallel.from_checkpoint(model, to_load), "rng": to_load["rng"]}
        set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    else:
        model.load_state_dict(to_load["model"])
    torch.set_rng_state(to_load["rng"])
    return state


def check_covers(path: Path, metadata: Metadata, to_load: dict[str, Any]) -> None:
    """Every tensor ``to_load`` needs is in the checkpoint with its global shape, every row of it (for expert
    tensors: every expert) is held by some saved chunk, and every file holds the bytes the index points to."""
    saved = metadata.state_dict_metadata
    for fqn, tensor in _flat_tensors(to_load):
        entry = saved.get(fqn)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {path} has no tensor {fqn!r} (it holds {len(saved)} entries, e.g. "
                                  f"{sorted(saved)[:3]}): written by another model or version")
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint {path}: {fqn} has shape {list(entry.size)}, this model needs "
                                  f"{list(tensor.shape)}")
        missing = _uncovered_rows(entry)
        if missing:
            what = "experts" if ".experts." in fqn else "rows"
            raise CheckpointError(f"checkpoint {path} does not cover every expert of every layer: {fqn} lacks "
                                  f"{what} {missing}")
    for file, needed in _bytes_per_file(metadata).items():
        size = (path / file).stat().st_size if (path / file).is_file() else None
        if size is None or size < needed:
            raise CheckpointError(f"checkpoint {path}: file {file} is "
                                  f"{'missing' if size is None else f'truncated ({size} bytes, needs {needed})'}")


def _flat_tensors(state: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(DCP key, tensor) pairs: nested keys joined with dots, as DCP flattens them."""
    if isinstance(state, torch.Tensor):
        return [(prefix, state)]
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [pair for key, value in items for pair in _flat_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def _uncovered_rows(entry: TensorStorageMetadata) -> list[int]:
    """Rows (dim 0) of a saved tensor that no saved chunk holds completely (checked by volume per row band)."""
    size = tuple(entry.size)
    if not size:
        return [] if entry.chunks else [0]
    row_volume = math.prod(size[1:])
    held = [0] * size[0]
    for chunk in entry.chunks:
        share = math.prod(chunk.sizes[1:])
        for row in range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]):
            held[row] += share
    return [row for row, volume in enumerate(held) if volume < row_volume]


def _bytes_per_file(metadata: Metadata) -> dict[str, int]:
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def _first_cause(err: BaseException) -> str:
    """DCP wraps per-rank failures; the innermost message is the one that says what went wrong."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _differences(saved: Any, wanted: Any, prefix: str) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(set(saved) | set(wanted))
        return "; ".join(f"{prefix}.{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}"
                         for k in keys if saved.get(k) != wanted.get(k))
    return f"{prefix}: saved {saved!r}, now {wanted!r}"


# ---- reading without unpickling arbitrary objects -----------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index is a pickle; only its own data classes, torch sizes/dtypes/layouts and paths may appear in it."""

    DATA_MODULES = ("torch.distributed.checkpoint.metadata",)
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or self._is_data_class(module, name) or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")

    def _is_data_class(self, module: str, name: str) -> bool:
        found = getattr(importlib.import_module(module), name, None) if module in self.DATA_MODULES else None
        return isinstance(found, type) and found.__module__ == module


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata is unpickled through :class:`_MetadataUnpickler`."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._checkpoint = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        file = self._checkpoint / (METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
        try:
            with open(file, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {self._checkpoint}: unreadable index {file.name}: {err}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint {self._checkpoint}: {file.name} is not a DCP index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters) are plain data: refuse anything else before loading."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn} is not plain data: "
                                  f"{str(err).splitlines()[0]}") from None
        super().load_bytes(read_item, io.BytesIO(data))
