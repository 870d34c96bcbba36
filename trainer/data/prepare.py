"""``hecate prepare-data``: corpus -> split by file -> tokenizer (trained on train) -> shards -> manifest.

The output is a pure function of (inputs' files, vocab_size, val_fraction): preparing twice, in another
process or with another thread count gives the same bytes. Everything is computed in memory first, then
written into a hidden folder beside ``out`` that replaces ``out`` at the end, so a failed or interrupted
prepare never leaves a half-written data folder where a trainer would read it.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hecate.collectives.errors import DataError
from hecate.trainer.data.corpus import Document, collect_documents
from hecate.trainer.data.manifest import FORMAT_VERSION, MANIFEST_FILE, write_manifest
from hecate.trainer.data.shards import DTYPE, encode_documents, shard_file
from hecate.trainer.data.tokenizer import (EOT, TOKENIZER_FILE, check_vocab_size, tokenizer_from_str,
                                           train_tokenizer)


def prepare_data(inputs: Sequence[str], out: str | os.PathLike, vocab_size: int = 8192,
                 val_fraction: float = 0.05, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare ``out`` from ``inputs`` ('stdlib' and/or files and folders); returns the manifest written."""
    out = Path(out)
    check_vocab_size(vocab_size)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _check_replaceable(out)
    started = time.perf_counter()

    documents, skipped = collect_documents(inputs)
    if len(documents) < 2:
        raise DataError(f"the corpus of {list(inputs)} has {len(documents)} non-empty file(s) "
                        f"({', '.join(d.name for d in documents)}); a split by file needs at least 2")
    splits = split_by_file(documents, val_fraction)
    log(f"corpus: {len(documents)} files ({sum(len(d.text) for d in documents) / 1e6:.2f}M characters), "
        f"{len(splits['val'])} held out for validation, {len(skipped)} skipped")

    t0 = time.perf_counter()
    tokenizer_json = train_tokenizer([d.text for d in splits["train"]], vocab_size).to_str(pretty=True)
    tokenizer = tokenizer_from_str(tokenizer_json)  # encode with exactly what is saved
    eot_id = tokenizer.token_to_id(EOT)
    real_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    short = "" if real_vocab == vocab_size else f" (of {vocab_size} asked: the corpus ran out of pairs to merge)"
    log(f"tokenizer: {real_vocab} tokens{short} in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    shards, entries = {}, {}
    for split, docs in splits.items():
        tokens_N, lengths_D = encode_documents(tokenizer, [d.text for d in docs], eot_id)
        shards[split] = tokens_N.tobytes()
        entries[split] = {
            "files": [d.name for d in docs],
            "documents": len(docs),
            "tokens": int(tokens_N.size),
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            "max_document_tokens": int(lengths_D.max()),
            "sha256": hashlib.sha256(shards[split]).hexdigest(),
        }
        log(f"{split}: {entries[split]['tokens']:,} tokens, {entries[split]['bytes'] / entries[split]['tokens']:.2f} "
            f"bytes/token")
    log(f"encoded in {time.perf_counter() - t0:.1f} s")

    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": [str(spec) for spec in inputs],
        "val_fraction": val_fraction,
        "vocab_size": real_vocab,
        "eot_id": eot_id,
        "dtype": DTYPE,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        "gzip9_val_bpb": gzip9_bits_per_byte("".join(d.text for d in splits["val"]).encode("utf-8")),
        "skipped_files": skipped,
        "splits": entries,
    }
    _write_atomically(out, tokenizer_json, shards, manifest)
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s (gzip -9 on the val files: "
        f"{manifest['gzip9_val_bpb']:.3f} bits/byte)")
    return manifest


def split_by_file(documents: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    """{train, val}: whole files, in name order. The files with the smallest sha256(name) are held out -
    a choice that does not move when the corpus is copied elsewhere, and at least one file on each side."""
    n_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    by_hash = sorted(documents, key=lambda d: hashlib.sha256(d.name.encode("utf-8")).digest())
    val_names = {d.name for d in by_hash[:n_val]}
    return {"train": [d for d in documents if d.name not in val_names],
            "val": [d for d in documents if d.name in val_names]}


def gzip9_bits_per_byte(data: bytes) -> float:
    """What ``gzip -9`` spends per byte of ``data``: the bar a language model's bits per byte should beat."""
    return 8.0 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data)


def _check_replaceable(out: Path) -> None:
    """Only an absent folder, an empty one or prepared data may be replaced: never a user's other files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise DataError(f"output folder {out} is not a prepared data folder (no {MANIFEST_FILE}) and is not empty; "
                        f"choose another --out, or empty it first")


def _write_atomically(out: Path, tokenizer_json: str, shards: dict[str, bytes], manifest: dict[str, Any]) -> None:
    """Write into a hidden sibling folder, then swap it for ``out``; nothing temporary survives a failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.preparing-", dir=out.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the data from the other users of a cluster
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json.encode("utf-8"))
        for split, data in shards.items():
            (tmp / shard_file(split)).write_bytes(data)
        write_manifest(tmp, manifest)  # last: a folder with a manifest is complete
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
