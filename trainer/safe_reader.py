"""Reading a checkpoint without trusting it: DCP's index is a pickle, so it is unpickled with an allowlist of
DCP's own data classes and then checked field by field (types, shapes, file names inside the checkpoint's folder),
and the non-tensor values go through ``torch.load(weights_only=True)``. Damaged or forged bytes thus end in one
:class:`CorruptCheckpoint` naming the file, never in running code, reading outside the folder or a traceback -
also where the checksums were rewritten to match them.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from hecate.parallel.errors import CheckpointError
from hecate.trainer.integrity import CorruptCheckpoint, check_file_name

METADATA_FILE = ".metadata"  # DCP's index of the checkpoint's tensors and the byte ranges that hold them


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index is a pickle; only its own data classes, torch sizes/dtypes/layouts and paths may appear in it."""

    DATA_MODULES = ("torch.distributed.checkpoint.metadata",)
    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (
            (module, name) in self.ALLOWED
            or self._is_data_class(module, name)
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")

    def _is_data_class(self, module: str, name: str) -> bool:
        found = getattr(importlib.import_module(module), name, None) if module in self.DATA_MODULES else None
        return isinstance(found, type) and found.__module__ == module


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose index is unpickled through :class:`_MetadataUnpickler` and checked before use."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._checkpoint = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        try:
            data = (self._checkpoint / name).read_bytes()  # whole, so that no size it claims is allocated
        except OSError as err:
            raise CorruptCheckpoint(self._checkpoint, name, f"is unreadable ({err.strerror})") from None
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as err:  # noqa: BLE001  (whatever unpickling damaged or forged bytes raises: unreadable)
            raise CorruptCheckpoint(
                self._checkpoint, name, f"is not a readable DCP index ({type(err).__name__}: {first_line(err)})"
            ) from None
        _IndexCheck(self._checkpoint, name).check(metadata)
        if _field(metadata, "storage_meta") is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _IndexCheck:
    """An unpickled index holds DCP's data classes with the field types DCP writes, every shape consistent, and
    byte ranges in plain files of the checkpoint's own folder: no check after it, nor DCP, trips over a value."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name

    def check(self, metadata: Any) -> None:
        if not isinstance(metadata, Metadata):
            self._fail(f"is not a DCP index (it holds a {type(metadata).__name__})")
        entries, storage = _field(metadata, "state_dict_metadata"), _field(metadata, "storage_data")
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            self._fail("is malformed: no table of entries or of storage")
        for fqn, entry in entries.items():
            if not isinstance(fqn, str) or not (isinstance(entry, BytesStorageMetadata) or self._is_tensor(entry)):
                self._fail(f"is malformed: entry {fqn!r}")
        mapping = _field(metadata, "planner_data")
        if mapping is not None and not (
            isinstance(mapping, dict)
            and all(
                isinstance(fqn, str) and isinstance(keys, tuple) and all(isinstance(k, (str, int)) for k in keys)
                for fqn, keys in mapping.items()
            )
        ):
            self._fail("is malformed: planner_data")
        if not isinstance(_field(metadata, "storage_meta"), (StorageMeta, type(None))):
            self._fail("is malformed: storage_meta")
        for index, info in storage.items():
            if (
                not isinstance(index, MetadataIndex)
                or not isinstance(_field(index, "fqn"), str)
                or not isinstance(info, _StorageInfo)
                or not _is_natural(_field(info, "offset"))
                or not _is_natural(_field(info, "length"))
            ):
                self._fail(f"is malformed: storage entry {index!r}")
            check_file_name(self.folder, _field(info, "relative_path"), self.name)
            if _field(info, "transform_descriptors"):  # Hecate writes none; a transform runs code the index names
                self._fail(f"asks for stream transforms {info.transform_descriptors!r}")

    def _is_tensor(self, entry: Any) -> bool:
        size, chunks = _field(entry, "size"), _field(entry, "chunks")
        if (
            not isinstance(entry, TensorStorageMetadata)
            or not _is_shape(size)
            or not isinstance(chunks, list)
            or not isinstance(_field(entry, "properties"), TensorProperties)
            or not isinstance(_field(entry.properties, "dtype"), torch.dtype)
        ):
            return False
        return all(
            isinstance(chunk, ChunkStorageMetadata)
            and _is_shape(_field(chunk, "offsets"), len(size))
            and _is_shape(_field(chunk, "sizes"), len(size))
            and all(o + s <= n for o, s, n in zip(chunk.offsets, chunk.sizes, size))
            for chunk in chunks
        )

    def _fail(self, reason: str) -> None:
        raise CorruptCheckpoint(self.folder, self.name, reason)


def _field(value: Any, name: str) -> Any:
    """An attribute of an unpickled object, None where the pickle left it out (it sets attributes at will)."""
    return getattr(value, name, None)


def _is_natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_shape(value: Any, dims: int | None = None) -> bool:
    return isinstance(value, torch.Size) and all(n >= 0 for n in value) and dims in (None, len(value))


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters) are plain data: refuse anything else before loading."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # noqa: BLE001  (damaged or forged bytes can make torch.load raise anything)
            raise CheckpointError(
                f"checkpoint value {read_item.dest_index.fqn} is not plain data: {first_line(err)}"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
