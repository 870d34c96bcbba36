"""The two passes ``prepare`` makes over the corpus, one unit at a time, on every core.

    scan_unit    a 16-byte digest of each document (exact duplicates are found from these), and what was skipped
    encode_unit  the tokens of the unit's kept documents, each followed by EOT, into one file per split

Workers are forked processes that read their settings from ``init_worker`` (the tokenizer is sent once, not
with every unit). Results come back in unit order, so the output does not depend on the number of workers.

Legend: D = documents of a unit.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hecate.trainer.errors import DataError
from hecate.trainer.data.corpus import Unit
from hecate.trainer.data.readers import Unreadable, read_documents
from hecate.trainer.data.tokenizer import tokenizer_from_str

DIGEST_BYTES = 16
ENCODE_BATCH_CHARS = 1 << 22  # characters per encode_batch call: bounds the memory of the Encoding objects
DROP, TRAIN, VAL = -1, 0, 1
SPLIT_OF = {TRAIN: "train", VAL: "val"}
_settings: dict[str, Any] = {}


@dataclass
class UnitScan:
    digests: bytes  # DIGEST_BYTES per document, in order
    skipped: str | None = None  # why the whole unit was skipped
    skipped_records: dict[str, int] = field(default_factory=dict)


@dataclass
class SplitPart:
    """What one unit added to one split; its tokens are in ``path``."""

    path: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    max_document_tokens: int = 0


def init_worker(settings: dict[str, Any]) -> None:
    """Settings shared by every unit: text_field; for encoding also tokenizer_json, eot_id, dtype, tmp_dir."""
    _settings.clear()
    _settings.update(settings)
    if "tokenizer_json" in settings:
        _settings["tokenizer"] = tokenizer_from_str(settings["tokenizer_json"])


def scan_unit(unit: Unit) -> UnitScan:
    digests, skipped_records = bytearray(), Counter()
    try:
        for pieces in read_documents(unit, _settings["text_field"], skipped_records):
            digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
            for piece in pieces:
                digest.update(piece.encode("utf-8"))
            digests += digest.digest()
    except Unreadable as err:
        return UnitScan(b"", str(err), dict(skipped_records))
    return UnitScan(bytes(digests), None, dict(skipped_records))


def encode_unit(job: tuple[int, Unit, np.ndarray]) -> dict[str, SplitPart]:
    """{split: SplitPart} of the documents of ``unit`` that ``assign_D`` (TRAIN, VAL or DROP) keeps."""
    index, unit, assign_D = job
    try:
        return _encode_unit(index, unit, assign_D)
    except Unreadable as err:
        raise DataError(f"{unit.path} became unreadable while it was being prepared ({err})") from err


def _encode_unit(index: int, unit: Unit, assign_D: np.ndarray) -> dict[str, SplitPart]:
    tmp_dir = Path(_settings["tmp_dir"])
    sinks = {split: _SplitSink(tmp_dir / f"unit-{index:07d}-{split}.bin", _settings["dtype"], _settings["eot_id"])
             for split in SPLIT_OF.values()}
    batch: list[tuple[_SplitSink, str | None]] = []  # (sink, piece), or (sink, None) at a document's end
    batch_chars = 0
    documents = read_documents(unit, _settings["text_field"], Counter())
    for doc, pieces in enumerate(documents):
        if doc >= len(assign_D):
            raise DataError(f"{unit.path} changed while it was being prepared; prepare the data again")
        if assign_D[doc] == DROP:
            continue
        sink = sinks[SPLIT_OF[int(assign_D[doc])]]
        for piece in pieces:
            batch.append((sink, piece))
            batch_chars += len(piece)
            if batch_chars >= ENCODE_BATCH_CHARS:
                _encode(batch)
                batch, batch_chars = [], 0
        batch.append((sink, None))
    _encode(batch)
    return {split: sink.close() for split, sink in sinks.items()}


def _encode(batch: list[tuple[_SplitSink, str | None]]) -> None:
    tokenizer = _settings["tokenizer"]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets (>= 0.20)
    encodings = iter(encode([piece for _, piece in batch if piece is not None], add_special_tokens=False))
    for sink, piece in batch:
        if piece is None:
            sink.end_document()
        else:
            sink.add(next(encodings).ids, len(piece.encode("utf-8")))
    for sink in {sink for sink, _ in batch}:
        sink.flush()


class _SplitSink:
    """A unit's tokens of one split, appended to a file; EOT after each document."""

    def __init__(self, path: Path, dtype: str, eot_id: int):
        self.part = SplitPart(str(path))
        self.dtype, self.eot_id = dtype, eot_id
        self.pending: list[int] = []
        self.document_tokens = 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close(), which every caller reaches

    def add(self, ids: list[int], n_bytes: int) -> None:
        self.pending += ids
        self.document_tokens += len(ids)
        self.part.bytes += n_bytes

    def end_document(self) -> None:
        self.pending.append(self.eot_id)
        self.part.documents += 1
        self.part.max_document_tokens = max(self.part.max_document_tokens, self.document_tokens)
        self.document_tokens = 0

    def flush(self) -> None:
        self.file.write(np.array(self.pending, dtype=self.dtype).tobytes())
        self.part.tokens += len(self.pending)
        self.pending = []

    def close(self) -> SplitPart:
        self.flush()
        self.file.close()
        return self.part


def run_units(function: Callable[[Any], Any], jobs: Sequence[Any], sizes: Sequence[int], workers: int,
              settings: dict[str, Any], desc: str, progress: bool) -> Iterator[Any]:
    """``function(job)`` for every job, in job order, on ``workers`` forked processes (1: in this one)."""
    bar = tqdm(total=sum(sizes), desc=desc, unit="B", unit_scale=True, disable=not progress, mininterval=1.0)
    with bar, _pool(workers, settings) as pool:
        results = pool.imap(function, jobs, chunksize=1) if pool else map(function, jobs)
        for result, size in zip(results, sizes):
            bar.update(size)
            yield result


@contextmanager
def _pool(workers: int, settings: dict[str, Any]) -> Iterator[Any]:
    if workers <= 1:
        init_worker(settings)
        yield None
        return
    # Forked, not spawned: a spawned worker would import torch (through the package) only to read text.
    # Fork after the tokenizer has used its threads: say so, or every worker prints a warning about it.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=init_worker, initargs=(settings,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()
