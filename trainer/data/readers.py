"""Read the documents of one unit (``corpus.Unit``), each as bounded pieces of text, with the library made for
its format: the incremental UTF-8 decoder, ``json`` and ``gzip``, pyarrow, ``datasets``.

Memory stays bounded by a block, a record or a batch of rows, never by a file. What cannot be used is
skipped and counted: a whole file raises ``Unreadable`` (binary, not UTF-8, unreadable), a record that has
no text is counted in ``skipped_records`` by reason. Both passes of ``prepare`` read a unit the same way,
so the i-th document is the same document in each.
"""
from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator

from hecate.trainer.errors import DataError
from hecate.trainer.data.corpus import Unit
from hecate.trainer.data.pieces import cut_pieces

BLOCK_BYTES = 1 << 20
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (what git and grep look at)
BATCH_ROWS = 1024


class Unreadable(Exception):
    """The whole unit is skipped; the message is the reason reported for it."""


def read_documents(unit: Unit, text_field: str, skipped_records: Counter) -> Iterator[Iterator[str]]:
    """The unit's non-empty documents in order, each an iterator of pieces (consume it before the next).
    Reading them, not only this call, raises ``Unreadable``."""
    try:
        if unit.kind == "text":
            yield from _text_file(unit)
        elif unit.kind == "jsonl":
            yield from _records(_jsonl_texts(unit, text_field, skipped_records), skipped_records)
        elif unit.kind == "parquet":
            yield from _records(_parquet_texts(unit, text_field), skipped_records)
        else:
            yield from _records(_dataset_texts(unit, text_field), skipped_records)
    except OSError as err:
        raise Unreadable(f"unreadable ({err.strerror or err})") from err
    except (EOFError, zlib.error) as err:
        raise Unreadable(f"unreadable ({err})") from err


def _text_file(unit: Unit) -> Iterator[Iterator[str]]:
    with open(unit.path, "rb") as file:
        first = file.read(BLOCK_BYTES)
        if not first:
            raise Unreadable("empty")
        if b"\0" in first[:SNIFF_BYTES]:
            raise Unreadable("binary")
        yield cut_pieces(_decoded(unit, first, file))


def _decoded(unit: Unit, first: bytes, file) -> Iterator[str]:
    """The file's text block by block; a UTF-8 error skips the file, or is an error if the user named it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    block, offset = first, 0
    try:
        while block:
            yield decoder.decode(block)
            offset += len(block)
            block = file.read(BLOCK_BYTES)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        if unit.named and not unit.lenient:
            raise DataError(f"corpus file {unit.path} is not UTF-8 ({err.reason} at byte {offset + err.start}); "
                            f"convert it to UTF-8 or leave it out of the inputs") from err
        raise Unreadable("not UTF-8") from err
    except OSError as err:
        raise Unreadable(f"unreadable ({err.strerror or err})") from err


def _records(texts: Iterator[str | None], skipped_records: Counter) -> Iterator[Iterator[str]]:
    for text in texts:
        if text:
            yield cut_pieces([text])
        elif text is not None:
            skipped_records["empty"] += 1


def _jsonl_texts(unit: Unit, text_field: str, skipped_records: Counter) -> Iterator[str | None]:
    """Each line's ``text_field``; None (counted by reason) for a line that is not an object with a string there."""
    opener = gzip.open if unit.path.endswith(".gz") else open
    with opener(unit.path, "rb") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped_records["not JSON"] += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skipped_records[f"no string field {text_field!r}"] += 1
                continue
            yield text


def _parquet_texts(unit: Unit, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(unit.path).iter_batches(BATCH_ROWS, row_groups=[unit.part], columns=[text_field])
        for batch in batches:
            yield from (text or "" for text in batch.column(0).to_pylist())
    except pa.ArrowException as err:
        raise DataError(f"Parquet file {unit.path} is corrupt ({err}); repair or remove it") from err


def _dataset_texts(unit: Unit, text_field: str) -> Iterator[str | None]:
    from datasets import load_from_disk

    dataset = load_from_disk(unit.path)
    if unit.dataset_split is not None:
        dataset = dataset[unit.dataset_split]
    column = dataset.select_columns([text_field]).with_format("arrow")
    first, end = unit.part
    for start in range(first, end, BATCH_ROWS):
        yield from (text or "" for text in column[start:min(start + BATCH_ROWS, end)].column(0).to_pylist())
