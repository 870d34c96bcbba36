"""``hecate prepare-data``: corpus -> drop exact duplicates -> split by document -> tokenizer (trained on train,
or pretrained) -> token shards -> manifest.

The corpus is streamed: documents are read in bounded pieces by worker processes, twice (``passes.py``), and
never held whole; memory does not grow with the corpus (docs/BENCHMARKS.md, "Data preparation"). The output
is a pure function of (inputs' files, tokenizer or vocab_size, val_fraction): preparing twice, in another
process or with another number of workers gives the same bytes. Everything is written into a hidden folder
beside ``out`` that replaces ``out`` at the end, so a failed or interrupted prepare never leaves a
half-written data folder where a trainer would read it.

Legend: D = kept documents of the corpus.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import shutil
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hecate.trainer.errors import DataError
from hecate.trainer.data.corpus import Unit, list_units
from hecate.trainer.data.manifest import FORMAT_VERSION, MANIFEST_FILE, write_manifest
from hecate.trainer.data.passes import DIGEST_BYTES, DROP, TRAIN, VAL, encode_unit, run_units, scan_unit
from hecate.trainer.data.pieces import is_trainable
from hecate.trainer.data.readers import Unreadable, read_documents
from hecate.trainer.data.shards import SHARD_TOKENS, SPLITS, ShardWriter, token_dtype
from hecate.trainer.data.tokenizer import (EOT, TOKENIZER_FILE, check_vocab_size, pretrained_tokenizer,
                                           tokenizer_from_str, train_tokenizer, vocab_size_of)

POOL_MIN_BYTES = 8 << 20  # below this, starting worker processes costs more than it saves
TOKENIZER_TRAIN_CHARS = 1 << 28  # a tokenizer is trained on at most the first 256 Mi characters of train
COPY_BYTES = 1 << 24


def prepare_data(inputs: Sequence[str], out: str | os.PathLike, vocab_size: int = 8192,
                 val_fraction: float = 0.05, log: Callable[[str], None] = print, tokenizer: str | None = None,
                 text_field: str = "text", workers: int | None = None, progress: bool = True,
                 shard_tokens: int = SHARD_TOKENS) -> dict[str, Any]:
    """Prepare ``out`` from ``inputs`` ('stdlib' and/or files and folders); returns the manifest written.

    ``tokenizer``: a pretrained tokenizer.json or Hugging Face folder instead of training one on
    ``vocab_size``. ``workers``: processes that read and encode (default: every core for a corpus of
    more than a few MB). ``shard_tokens``: tokens per shard file."""
    out = Path(out)
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    _check_replaceable(out)
    started = time.perf_counter()
    units, skipped_files = list_units(inputs, text_field)
    pretrained = pretrained_tokenizer(tokenizer) if tokenizer is not None else None
    sizes = [unit.size for unit in units]
    if workers is None:
        workers = (os.cpu_count() or 1) if sum(sizes) >= POOL_MIN_BYTES else 1
    settings = {"text_field": text_field}

    scans = list(run_units(scan_unit, units, sizes, workers, settings, "reading", progress))
    skipped_records = {}
    for unit, scan in zip(units, scans):
        if scan.skipped:
            skipped_files[unit.name] = scan.skipped
        if scan.skipped_records:
            counts = Counter(skipped_records.get(unit.name, {})) + Counter(scan.skipped_records)
            skipped_records[unit.name] = dict(counts)
    assign, duplicates = _dedup_and_split(units, [scan.digests for scan in scans], val_fraction, inputs,
                                          skipped_files, skipped_records)
    kept = [int((a != DROP).sum()) for a in assign]
    n_val = sum(int((a == VAL).sum()) for a in assign)
    log(f"corpus: {sum(kept)} documents from {sum(1 for k in kept if k)} files ({sum(sizes) / 1e6:.1f} MB), "
        f"{n_val} held out for validation, {duplicates} exact duplicates dropped, "
        f"{len(skipped_files)} files skipped{_records_note(skipped_records)}")
    if skipped_files or skipped_records:
        log(f"{_skip_summary(skipped_files, skipped_records)} (all of them in {MANIFEST_FILE})")

    t0 = time.perf_counter()
    if pretrained is None:
        trained = train_tokenizer(_train_texts(units, assign, text_field, log), vocab_size)
        tokenizer_json, source = trained.to_str(pretty=True), "trained"
        eot_id = trained.token_to_id(EOT)
    else:
        (tokenizer_json, eot_id), source = pretrained, str(tokenizer)
    real_vocab = vocab_size_of(tokenizer_from_str(tokenizer_json))
    short = "" if pretrained or real_vocab == vocab_size else \
        f" (of {vocab_size} asked: the corpus ran out of pairs to merge)"
    log(f"tokenizer: {real_vocab} tokens{short} ({source}) in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    gzip_bpb = _gzip9_bits_per_byte(_split_texts(units, assign, VAL, text_field))
    dtype = token_dtype(real_vocab)
    with _staging(out) as tmp:
        settings.update(tokenizer_json=tokenizer_json, eot_id=eot_id, dtype=dtype, tmp_dir=str(tmp))
        jobs = [(i, unit, a) for i, (unit, a) in enumerate(zip(units, assign)) if kept[i]]
        parts = run_units(encode_unit, jobs, [unit.size for _, unit, _ in jobs], workers, settings, "encoding",
                          progress)
        entries = _write_shards(tmp, dtype, shard_tokens, parts, jobs)
        for split, entry in entries.items():
            log(f"{split}: {entry['tokens']:,} tokens in {len(entry['shards'])} shard(s), "
                f"{entry['bytes'] / max(entry['tokens'], 1):.2f} bytes/token")
        log(f"encoded in {time.perf_counter() - t0:.1f} s with {workers} process(es)")
        manifest = {
            "format_version": FORMAT_VERSION,
            "inputs": [str(spec) for spec in inputs],
            "text_field": text_field,
            "val_fraction": val_fraction,
            "tokenizer": source,
            "vocab_size": real_vocab,
            "eot_id": eot_id,
            "dtype": dtype,
            "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            "gzip9_val_bpb": gzip_bpb,
            "duplicates_dropped": duplicates,
            "skipped_files": dict(sorted(skipped_files.items())),
            "skipped_records": skipped_records,
            "splits": entries,
        }
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json.encode("utf-8"))
        write_manifest(tmp, manifest)  # last: a folder with a manifest is complete
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s (gzip -9 on the val documents: {gzip_bpb:.3f} "
        f"bits/byte)")
    return manifest


def _dedup_and_split(units: list[Unit], digests: list[bytes], val_fraction: float, inputs: Sequence[str],
                     skipped_files: dict[str, str], skipped_records: dict[str, dict[str, int]]
                     ) -> tuple[list[np.ndarray], int]:
    """assign_D per unit (TRAIN, VAL or DROP) and the number of duplicates dropped.

    The first copy of each exact duplicate is kept (corpus order), before the split, so that no document is
    in both splits. The documents with the smallest sha256(name) are held out: a choice that does not move
    when the corpus is copied elsewhere, with at least one document on each side."""
    digests_D2 = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, DIGEST_BYTES // 8)
    first = np.unique(digests_D2, axis=0, return_index=True)[1] if len(digests_D2) else np.zeros(0, np.int64)
    keep_D = np.zeros(len(digests_D2), dtype=bool)
    keep_D[first] = True
    skips = _skip_summary(skipped_files, skipped_records)
    if not keep_D.any():
        raise DataError(f"the corpus of {list(inputs)} is empty: no non-empty text document was read ({skips})")
    if keep_D.sum() < 2:
        raise DataError(f"the corpus of {list(inputs)} has 1 distinct non-empty document; a train/validation "
                        f"split needs at least 2 ({skips})")
    names = list(_document_names(units, [len(d) // DIGEST_BYTES for d in digests]))
    kept = np.flatnonzero(keep_D)
    n_val = min(max(1, round(val_fraction * len(kept))), len(kept) - 1)
    by_hash = sorted(kept, key=lambda d: hashlib.sha256(names[d].encode("utf-8")).digest())
    assign_D = np.where(keep_D, TRAIN, DROP).astype(np.int8)
    assign_D[np.array(by_hash[:n_val])] = VAL
    bounds = np.cumsum([0] + [len(d) // DIGEST_BYTES for d in digests])
    return [assign_D[a:b] for a, b in itertools.pairwise(bounds)], len(digests_D2) - len(kept)


def _document_names(units: list[Unit], counts: list[int]) -> Iterator[str]:
    """A text file's document is named as the file; records as ``file#index`` (counted over all its units)."""
    for name, group in itertools.groupby(zip(units, counts), key=lambda uc: uc[0].name):
        group = list(group)
        if group[0][0].kind == "text":
            yield from [name] * sum(count for _, count in group)
        else:
            yield from (f"{name}#{i}" for i in range(sum(count for _, count in group)))


def _split_texts(units: list[Unit], assign: list[np.ndarray], split: int, text_field: str) -> Iterator[str]:
    """The pieces of a split's documents in corpus order, read in this process."""
    for unit, assign_D in zip(units, assign):
        if not (assign_D == split).any():
            continue
        try:
            for doc, pieces in enumerate(read_documents(unit, text_field, Counter())):
                if doc < len(assign_D) and assign_D[doc] == split:
                    yield from pieces
        except Unreadable as err:
            raise DataError(f"{unit.path} became unreadable while it was being prepared ({err})") from err


def _train_texts(units: list[Unit], assign: list[np.ndarray], text_field: str, log: Callable[[str], None]
                 ) -> Iterator[str]:
    """The train split's pieces, up to TOKENIZER_TRAIN_CHARS characters, without over-long words."""
    chars = 0
    for piece in filter(is_trainable, _split_texts(units, assign, TRAIN, text_field)):
        yield piece
        chars += len(piece)
        if chars >= TOKENIZER_TRAIN_CHARS:
            log(f"tokenizer: trained on the first {chars / 1e6:.0f}M characters of the train split")
            return


def _write_shards(tmp: Path, dtype: str, shard_tokens: int, parts: Iterable[dict[str, Any]],
                  jobs: list[tuple[int, Unit, Any]]) -> dict[str, dict[str, Any]]:
    """Append each unit's token files to its split's shards, in unit order; the splits' manifest entries."""
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    entries = {split: {"files": [], "documents": 0, "tokens": 0, "bytes": 0, "max_document_tokens": 0}
               for split in SPLITS}
    for (_, unit, _), unit_parts in zip(jobs, parts):
        for split, part in unit_parts.items():
            entry = entries[split]
            if part.documents and unit.name not in entry["files"][-1:]:
                entry["files"].append(unit.name)
            for key in ("documents", "tokens", "bytes"):
                entry[key] += getattr(part, key)
            entry["max_document_tokens"] = max(entry["max_document_tokens"], part.max_document_tokens)
            with open(part.path, "rb") as file:
                while block := file.read(COPY_BYTES):
                    writers[split].write(block)
            os.remove(part.path)
    for split, writer in writers.items():
        entries[split]["shards"] = writer.close()
        entries[split]["sha256"] = writer.split_hash.hexdigest()
    return entries


def gzip9_bits_per_byte(data: bytes) -> float:
    """What ``gzip -9`` spends per byte of ``data``: the bar a language model's bits per byte should beat."""
    return 8.0 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data)


def _gzip9_bits_per_byte(texts: Iterable[str]) -> float:
    """``gzip9_bits_per_byte`` of the texts' UTF-8 concatenation, streamed (the same deflate stream)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header, as gzip.compress writes
    size = compressed = 0
    for text in texts:
        data = text.encode("utf-8")
        size += len(data)
        compressed += len(compressor.compress(data))
    compressed += len(compressor.flush())
    return 8.0 * compressed / max(size, 1)


def _records_note(skipped_records: dict[str, dict[str, int]]) -> str:
    total = sum(sum(reasons.values()) for reasons in skipped_records.values())
    return f", {total} records skipped" if total else ""


def _skip_summary(skipped_files: dict[str, str], skipped_records: dict[str, dict[str, int]], show: int = 5) -> str:
    shown = [f"{name}: {reason}" for name, reason in list(skipped_files.items())[:show]]
    shown += [f"{name}: {count} {reason}" for name, reasons in list(skipped_records.items())[:show]
              for reason, count in reasons.items()]
    more = len(skipped_files) + len(skipped_records) - len(shown)
    return "skipped: " + (", ".join(shown) or "nothing") + (f", ... {more} more" if more > 0 else "")


def _check_replaceable(out: Path) -> None:
    """Only an absent folder, an empty one or prepared data may be replaced: never a user's other files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise DataError(f"output folder {out} is not a prepared data folder (no {MANIFEST_FILE}) and is not empty; "
                        f"choose another --out, or empty it first")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden sibling folder to write into, swapped for ``out`` at the end; nothing survives a failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.preparing-", dir=out.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the data from the other users of a cluster
        yield tmp
        if out.exists():
            old = out.with_name(f"{tmp.name}.old")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)  # put the previous data back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
