"""Atomic, resumable, re-shardable checkpoints in ``RUN_DIR/checkpoints/step_XXXXXXXX``.

Tensors (model, optimizer, RNG) go through ``torch.distributed.checkpoint`` (DCP): every expert is saved once
with its global shape, so a checkpoint loads into any other layout (world size, EP degree, FSSDP owners); the
small trainer state (step, data position, model config, FSSDP owners and load windows) is JSON.
A checkpoint is written into a hidden temporary folder, completed with a ``COMPLETE`` marker written last,
then renamed into place: a reader never sees a half-written checkpoint, and an interrupted save leaves
only a temporary folder that is ignored (and cleaned up by the next save). Before the marker, the ranks hash
every file (each a share) into a ``SHA256SUMS`` manifest (:mod:`hecate.trainer.integrity`). A save that cannot
write (a read-only or full disk) fails the step with one error, removes its temporary folder and keeps the
older checkpoints. With ``checkpoint.async_save`` the tensors are copied in memory and written by a background
thread while training goes on; checksums and marker come when the write has finished on every rank.

Resuming (:func:`usable_checkpoint`) takes the newest checkpoint whose files match their checksums; a newer one
that is damaged or incomplete is named in a warning and passed over, and a run whose checkpoints are all
damaged stops with one error rather than starting over.

Loading reads nothing it has not checked: the metadata is unpickled with an allowlist of DCP's own data
classes, non-tensor values through ``torch.load(weights_only=True)``, and before any tensor is read the
checkpoint must hold every tensor this model needs, with its shape, every row (expert) of it, and the bytes
its files promise, in files inside its own folder - so a truncated, partial, forged or mismatched checkpoint
fails with one error naming what, even where its checksums were rewritten to match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hecate.parallel.config import MoEConfig
from hecate.parallel.errors import CheckpointError
from hecate.parallel.parallelize import Parallel
from hecate.trainer import integrity
from hecate.trainer.config import ModelConfig
from hecate.trainer.faults import maybe_inject
from hecate.trainer.integrity import CorruptCheckpoint, IncompleteCheckpoint
from hecate.trainer.safe_reader import METADATA_FILE, SafeLoadPlanner, SafeReader, first_line

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"
TMP = ".tmp-"  # a save in progress (or interrupted) writes into TMP + its final name
# Whatever a DCP save or load raises fails it with one error: the files (a full disk, damaged or forged bytes) can
# make it raise nearly anything, and its CheckpointException, which gathers every rank's failure, is a BaseException.
DCP_FAILURES = (Exception, CheckpointException)
MOE_SHAPE_FIELDS = (
    "num_experts",
    "ffn_dim",
    "activation",
    "every",
    "first_moe_block",
    "shared_experts",
    "shared_ffn_dim",
    "shared_gate",
)

# Without a process group one process is the whole job; DCP says so on every save and load (a background save
# says it from its own thread, after any catch_warnings block has ended).
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")


def model_identity(model_cfg: Any, moe_cfg: Any, vocab_size: int) -> dict[str, Any]:
    """What a checkpoint or an export must match to be loaded into a model: its shape, not how it is trained."""
    moe = dataclasses.asdict(moe_cfg)
    return {
        "model": dataclasses.asdict(model_cfg),
        "moe": {k: moe[k] for k in MOE_SHAPE_FIELDS},
        "vocab_size": vocab_size,
    }


def check_identity(saved: dict[str, Any], expect: dict[str, Any], what: str) -> None:
    """Raise naming every differing field when ``saved`` was written for another model than ``expect``."""
    saved = _with_later_fields(saved)
    differences = [
        _differences(saved.get(key), wanted, key) for key, wanted in expect.items() if saved.get(key) != wanted
    ]
    if differences:
        raise CheckpointError(f"{what} was written for another model: {'; '.join(differences)}")


def _with_later_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """An identity written before some model or MoE fields existed: those fields take their defaults, which build
    the model it was (``shared_expert: true`` is one shared expert of ffn_dim)."""
    if not isinstance(saved.get("model"), dict) or not isinstance(saved.get("moe"), dict):
        return saved
    moe = dict(saved["moe"])
    if "shared_expert" in moe:
        moe["shared_experts"] = int(bool(moe.pop("shared_expert")))
    moe_defaults = dataclasses.asdict(MoEConfig())
    return {
        **saved,
        "model": {**dataclasses.asdict(ModelConfig()), **saved["model"]},
        "moe": {**{k: moe_defaults[k] for k in MOE_SHAPE_FIELDS}, **moe},
    }


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
    for path in sorted(root.glob(f"{TMP}{PREFIX}*")):
        log.warning("ignoring incomplete checkpoint %s (a save that was interrupted or is still running)", path)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, unchecked: :func:`usable_checkpoint` is the one to load."""
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def usable_checkpoint(root: Path, parallel: Parallel | None = None) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; each newer damaged one is named in a
    warning and passed over. None when ``root`` holds no complete checkpoint; a :class:`CheckpointError` naming
    every damaged file when it holds some but none is usable (starting over would silently lose the run).
    With ``parallel`` the ranks share the hashing: collective, every rank calls it."""
    damaged = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify_checkpoint(path, parallel)
        except CorruptCheckpoint as err:
            log.warning("%s; trying the checkpoint before it", err)
            damaged.append(str(err))
            continue
        return path
    if damaged:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(damaged)}")
    return None


def verify_checkpoint(path: Path, parallel: Parallel | None = None) -> None:
    """Raise :class:`IncompleteCheckpoint` or :class:`CorruptCheckpoint` (naming the file) unless ``path`` is
    complete, its manifest lists its index and trainer state, every listed file has its checksum, and the index
    is plain data pointing only at listed files. With ``parallel`` each rank hashes a share of the files
    (collective: every rank calls it, and all raise the same error)."""
    if path.name.startswith(TMP) or not (path / COMPLETE).is_file():
        raise IncompleteCheckpoint(
            f"checkpoint {path} is incomplete: no {COMPLETE} marker (its save was interrupted or is still running)"
        )
    digests = integrity.read_manifest(path)
    for required in (METADATA_FILE, STATE_FILE):
        if required not in digests:
            raise CorruptCheckpoint(path, integrity.MANIFEST, f"does not list {required}")
    parallel = parallel if parallel is not None else Parallel.single()
    share = dict(sorted(digests.items())[parallel.rank :: parallel.dims.world])
    failures = _gather(parallel, _failure(lambda: integrity.check_files(path, share)))
    first = next((failure for failure in failures if failure is not None), None)
    if first is not None:
        raise CorruptCheckpoint(path, *first)
    for file in _bytes_per_file(SafeReader(path).read_metadata()):
        if file not in digests:
            raise CorruptCheckpoint(path, METADATA_FILE, f"points at {file}, which {integrity.MANIFEST} does not list")


def checkpoint_statuses(root: Path) -> list[tuple[Path, str]]:
    """Every checkpoint folder under ``root`` (finished or not), oldest first, with ``ok``, ``incomplete: ...``
    or ``corrupt: FILE ...``: what ``hecate checkpoints verify`` prints."""
    folders = [*root.glob(PREFIX + "*"), *root.glob(f"{TMP}{PREFIX}*")] if root.is_dir() else []
    statuses = []
    for path in sorted(folders, key=lambda folder: (folder.name.removeprefix(TMP), folder.name.startswith(TMP))):
        try:
            verify_checkpoint(path)
            statuses.append((path, "ok"))
        except IncompleteCheckpoint:
            statuses.append((path, f"incomplete: no {COMPLETE} marker (a save that was interrupted or is running)"))
        except CorruptCheckpoint as err:
            statuses.append((path, f"corrupt: {err.file} {err.reason}"))
    return statuses


def _failure(check: Any) -> tuple[str, str] | None:
    """(file, reason) of the :class:`CorruptCheckpoint` that ``check()`` raises, None when it passes."""
    try:
        check()
    except CorruptCheckpoint as err:
        return err.file, err.reason
    return None


def _gather(parallel: Parallel, value: Any) -> list[Any]:
    """``value`` from every rank, by rank (collective over the default group; ``[value]`` on one process)."""
    if parallel.dims.world == 1 or not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * parallel.dims.world
    dist.all_gather_object(values, value)
    return values


# ---- saving ---------------------------------------------------------------------------------------------------


class Checkpointer:
    """A run's checkpoint writer: one save at a time, synchronous or in the background, newest ``keep`` kept.

    Collective: every rank calls :meth:`save` and :meth:`wait` at the same steps; rank 0 alone creates,
    completes, renames and prunes, every rank hashes a share of the files. A background save talks over its own
    gloo group, so that it never interleaves with the training step's collectives on the default group. A save
    that fails raises the same :class:`CheckpointError` on every rank and leaves the older checkpoints as they were.
    """

    def __init__(self, root: Path, keep: int, parallel: Parallel | None = None, async_save: bool = False):
        self.root = root
        self.keep = keep
        self.parallel = parallel if parallel is not None else Parallel.single()
        self.async_save = async_save
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: tuple[Future, int] | None = None  # (write in flight, its step)

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
    ) -> Path:
        """Write the checkpoint taken after ``step`` optimizer steps (the previous background save finishes
        first). Returns its final path; with ``async_save`` it is complete only after :meth:`wait`."""
        self.wait()
        tmp, final = self._paths(step)
        self._on_every_rank(step, lambda: _begin(tmp, {"step": step, **trainer_state}))
        maybe_inject(self.parallel.rank, step, during="save")
        tensors = _tensors(model, optimizer, self.parallel)
        try:
            if self.async_save:
                self._pending = (
                    dcp.async_save(
                        tensors, checkpoint_id=tmp, process_group=self._group, no_dist=not dist.is_initialized()
                    ),
                    step,
                )
                return final
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        except DCP_FAILURES as err:
            self._abandon(step, _first_cause(err))
        self._complete(step)
        return final

    def wait(self) -> None:
        """Finish the background save in flight, if any: its write, then checksums, marker, rename and pruning."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        try:
            future.result()
        except DCP_FAILURES as err:
            self._abandon(step, _first_cause(err))
        self._complete(step)

    def _paths(self, step: int) -> tuple[Path, Path]:
        """(temporary folder, final folder) of the checkpoint of ``step``."""
        final = self.root / f"{PREFIX}{step:08d}"
        return self.root / f"{TMP}{final.name}", final

    def _complete(self, step: int) -> None:
        """Once every rank's share is written (DCP's finish step gathers them): every rank hashes a share of the
        files, then rank 0 writes the manifest and the marker, renames the folder into place and prunes."""
        tmp, final = self._paths(step)
        names = sorted(file.name for file in tmp.iterdir()) if tmp.is_dir() else []
        share = names[self.parallel.rank :: self.parallel.dims.world]
        hashed = _gather(self.parallel, _attempt(lambda: {name: integrity.file_sha256(tmp / name) for name in share}))
        digests = {name: digest for part in hashed if isinstance(part, dict) for name, digest in part.items()}
        failure = next((part for part in hashed if isinstance(part, str)), None)
        self._on_every_rank(step, lambda: _seal(tmp, final, digests, step), failure)
        if self.parallel.is_main:
            for stale in self.root.glob(f"{TMP}*"):
                shutil.rmtree(stale, ignore_errors=True)
            for old in checkpoint_dirs(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.parallel.barrier()

    def _on_every_rank(self, step: int, main_work: Any, failure: str | None = None) -> None:
        """Rank 0 does ``main_work`` (unless ``failure`` is already known); then every rank learns whether it failed
        and, if so, abandons the save with the same error."""
        if failure is None and self.parallel.is_main:
            failure = _attempt(main_work)
        failure = _gather(self.parallel, failure if self.parallel.is_main else None)[0]
        if isinstance(failure, str):
            self._abandon(step, failure)

    def _abandon(self, step: int, cause: str) -> None:
        """Remove this save's temporary folder (rank 0) and raise: a save that failed leaves nothing behind."""
        tmp, _ = self._paths(step)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write the checkpoint of step {step} in {self.root}: {cause}; the older checkpoints are kept"
        )


def _begin(tmp: Path, trainer_state: dict[str, Any]) -> None:
    """Rank 0: a fresh temporary folder holding the trainer state."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))


def _seal(tmp: Path, final: Path, digests: dict[str, str], step: int) -> None:
    """Rank 0: the manifest, then the marker (each flushed to disk), then the rename that makes it visible."""
    integrity.write_manifest(tmp, digests)
    with open(tmp / COMPLETE, "w") as marker:
        marker.write(f"{step}\n")
        marker.flush()
        os.fsync(marker.fileno())
    if final.exists():  # a re-run of the same step (e.g. after a resume): the new one replaces it
        shutil.rmtree(final)
    tmp.rename(final)


def _attempt(work: Any) -> Any:
    """``work()``'s result, or one line saying why it failed to write or read a file."""
    try:
        return work()
    except OSError as err:
        return f"{err.strerror or err} ({err.filename})" if err.filename else str(err)


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


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    expect: dict[str, Any],
    parallel: Parallel | None = None,
) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) in place, from any layout's checkpoint; returns the trainer state.
    Its checksums are not checked here: take ``path`` from :func:`usable_checkpoint` (or check it with
    :func:`verify_checkpoint`), which does so once for all ranks.

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
    except DCP_FAILURES as err:
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
            raise CheckpointError(
                f"checkpoint {path} has no tensor {fqn!r} (it holds {len(saved)} entries, e.g. "
                f"{sorted(saved)[:3]}): written by another model or version"
            )
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path}: {fqn} has shape {list(entry.size)}, this model needs {list(tensor.shape)}"
            )
        missing = _uncovered_rows(entry)
        if missing:
            what = "experts" if ".experts." in fqn else "rows"
            raise CheckpointError(
                f"checkpoint {path} does not cover every expert of every layer: {fqn} lacks {what} {missing}"
            )
    for file, needed in _bytes_per_file(metadata).items():
        size = (path / file).stat().st_size if (path / file).is_file() else None
        if size is None or size < needed:
            raise CheckpointError(
                f"checkpoint {path}: file {file} is "
                f"{'missing' if size is None else f'truncated ({size} bytes, needs {needed})'}"
            )


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
    """DCP wraps per-rank failures (in a :class:`CheckpointException` of (exception, traceback) pairs); the
    innermost message is the one that says what went wrong. Hecate's own errors speak for themselves."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        _, wrapped = min(failures.items())
        err = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    while err.__cause__ is not None:
        err = err.__cause__
    return first_line(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {first_line(err)}"


def _differences(saved: Any, wanted: Any, prefix: str) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(set(saved) | set(wanted))
        return "; ".join(
            f"{prefix}.{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}"
            for k in keys
            if saved.get(k) != wanted.get(k)
        )
    return f"{prefix}: saved {saved!r}, now {wanted!r}"
