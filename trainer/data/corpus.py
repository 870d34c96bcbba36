"""List the corpus: which inputs hold which documents, as units of work that can be read in any process.

An input is the keyword ``stdlib`` (the ``.py`` files of the running Python's standard library) or a path:

    folder             every regular, non-hidden file below it, by kind (below); a folder written by
                       ``datasets.Dataset.save_to_disk`` is a dataset instead
    *.jsonl[.gz]       one document per line: the string in field ``text_field``
    *.parquet          one document per row: the string in column ``text_field`` (pyarrow)
    any other file     one document, if its content is UTF-8 text (whatever its name: ``LICENSE`` is text)

A document is named after its input's last folder component (``corpus/pkg/mod_01.py``, a record
``corpus/a.jsonl#12``), so names - and hence the train/val split - do not depend on where the corpus sits.
Listing opens nothing but Parquet footers and dataset metadata, so a corrupt Parquet file or a dataset
without the text column is an error before any worker starts. What a file holds is found when it is read
(``readers.py``): binary, unreadable and non-regular files (FIFOs, sockets) are skipped and reported.
"""
from __future__ import annotations

import os
import stat
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hecate.trainer.errors import DataError

STDLIB = "stdlib"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIX = ".parquet"
DATASET_MARKERS = ("dataset_info.json", "state.json")  # what save_to_disk writes for one Dataset
DATASET_DICT_MARKER = "dataset_dict.json"  # ... and for a DatasetDict
DATASET_ROWS_PER_UNIT = 100_000
# Installed third-party packages live below the stdlib folder but are not the standard library.
NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus one worker reads: a file, a Parquet row group or a range of dataset rows.

    ``kind`` is text | jsonl | parquet | dataset. ``named``: the user named this file itself, so a text
    file that is not UTF-8 is an error rather than a skip. ``lenient``: the stdlib, whose few non-UTF-8
    test fixtures are skipped. ``part``: the row group (parquet) or (first, end) rows (dataset)."""

    name: str
    path: str
    kind: str
    size: int  # bytes on disk it stands for: what progress counts
    named: bool = False
    lenient: bool = False
    part: int | tuple[int, int] | None = None
    dataset_split: str | None = None


def list_units(inputs: Sequence[str], text_field: str) -> tuple[list[Unit], dict[str, str]]:
    """The units of ``inputs`` in corpus order (by name; a file's row groups in order), and the files skipped
    while listing {name: reason}."""
    if not inputs:
        raise DataError("no corpus inputs given: pass 'stdlib' and/or files or folders")
    units: list[Unit] = []
    skipped: dict[str, str] = {}
    origin: dict[str, str] = {}  # name -> input, to name both inputs of a clash
    for spec in inputs:
        for unit in _units_of(spec, text_field, skipped):
            if origin.setdefault(unit.name, spec) != spec:
                raise DataError(f"inputs {origin[unit.name]!r} and {spec!r} both give the corpus file name "
                                f"{unit.name!r}; list each file once (or rename one of the folders)")
            units.append(unit)
    return sorted(units, key=lambda unit: unit.name), skipped


def _units_of(spec: str, text_field: str, skipped: dict[str, str]) -> list[Unit]:
    if spec == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return [Unit(f"{STDLIB}/{rel}", str(root / rel), "text", (root / rel).stat().st_size, lenient=True)
                for rel in _walk(root, (".py",), skip_dirs=NOT_STDLIB)]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus input {spec} does not exist (pass 'stdlib' or an existing file or folder)")
    prefix = path.resolve().name
    if _is_dataset(path):
        return _dataset_units(path, prefix, text_field)
    if not path.is_dir():
        return _file_units(path, prefix, text_field, skipped, named=True)
    units: list[Unit] = []
    for rel in _walk(path):
        units += _file_units(path / rel, f"{prefix}/{rel}", text_field, skipped, named=False)
    return units


def _file_units(path: Path, name: str, text_field: str, skipped: dict[str, str], named: bool) -> list[Unit]:
    try:
        info = path.stat()
    except OSError as err:
        skipped[name] = f"unreadable ({err.strerror or err})"
        return []
    if not stat.S_ISREG(info.st_mode):
        skipped[name] = "not a regular file"
        return []
    if path.name.endswith(JSONL_SUFFIXES):
        return [Unit(name, str(path), "jsonl", info.st_size)]
    if path.name.endswith(PARQUET_SUFFIX):
        groups = _parquet_row_groups(path, text_field)
        return [Unit(name, str(path), "parquet", info.st_size // max(groups, 1), part=g) for g in range(groups)]
    return [Unit(name, str(path), "text", info.st_size, named=named)]


def _parquet_row_groups(path: Path, text_field: str) -> int:
    """Row groups of a Parquet file whose footer is readable and which has a string column ``text_field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
        groups = pq.ParquetFile(path).metadata.num_row_groups
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"Parquet file {path} is corrupt or unreadable ({err}); repair or remove it") from err
    _check_text_column(path, schema, text_field)
    return groups


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and (all((path / m).is_file() for m in DATASET_MARKERS)
                              or (path / DATASET_DICT_MARKER).is_file())


def _dataset_units(path: Path, prefix: str, text_field: str) -> list[Unit]:
    """A ``save_to_disk`` folder (memory-mapped, nothing read): ranges of rows of each of its splits."""
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged folder
        raise DataError(f"dataset folder {path} cannot be loaded ({err}); save it again with save_to_disk") from err
    splits = {None: loaded} if isinstance(loaded, Dataset) else dict(sorted(loaded.items()))
    units = []
    for split, dataset in splits.items():
        _check_text_column(path, dataset.features.arrow_schema, text_field)
        name = prefix if split is None else f"{prefix}/{split}"
        size = sum(os.path.getsize(f["filename"]) for f in dataset.cache_files) // max(dataset.num_rows, 1)
        for first in range(0, dataset.num_rows, DATASET_ROWS_PER_UNIT):
            end = min(first + DATASET_ROWS_PER_UNIT, dataset.num_rows)
            units.append(Unit(name, str(path), "dataset", size * (end - first), part=(first, end),
                              dataset_split=split))
    return units


def _check_text_column(path: Path, schema, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (it has {', '.join(schema.names)}); "
                        f"pass the text column with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"column {text_field!r} of {path} holds {kind}, not strings; pass the text column "
                        f"with --text-field")


def _walk(root: Path, suffixes: tuple[str, ...] | None = None, skip_dirs: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the files below ``root`` (with one of ``suffixes``); hidden entries skipped."""
    skip = set(skip_dirs)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and (suffixes is None or f.endswith(suffixes))]
    return sorted(found)
