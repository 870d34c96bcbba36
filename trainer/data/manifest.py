"""``manifest.json``: what a prepared data folder holds, as plain JSON a person can read.

    format_version, inputs, text_field, val_fraction, tokenizer ("trained" or the pretrained one's path),
    vocab_size, eot_id, dtype ("<u2" or "<u4"), tokenizer_sha256, gzip9_val_bpb, duplicates_dropped,
    skipped_files {name: reason}, skipped_records {file: {reason: count}},
    splits {train|val: {files, documents, tokens, bytes, max_document_tokens, sha256,
                        shards [{file, tokens, sha256}]}}

``files`` lists the input files that gave the split documents, in shard order (a text file is one document,
a JSONL or Parquet file gives one per record); ``bytes`` is the documents' UTF-8 size; ``max_document_tokens``
excludes the EOT; ``sha256`` is that of the split's shards concatenated. Loading checks that the folder is
complete (the shards exist with the manifest's sizes, the tokenizer has its hash), so a half-copied folder
fails here, naming the file, rather than mid-run; a loader opening a split also checks its shards' sha256
and token ids (``shards.open_tokens``). Format 1 (one ``train.bin`` / ``val.bin``, no ``shards``) still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hecate.trainer.errors import DataError
from hecate.trainer.data.shards import SPLITS, open_tokens
from hecate.trainer.data.tokenizer import TOKENIZER_FILE

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED = (
    "format_version",
    "inputs",
    "vocab_size",
    "eot_id",
    "dtype",
    "tokenizer_sha256",
    "gzip9_val_bpb",
    "skipped_files",
    "splits",
)
SPLIT_REQUIRED = ("files", "documents", "tokens", "bytes", "max_document_tokens", "sha256")


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    (data_dir / MANIFEST_FILE).write_bytes(text.encode("utf-8"))


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete prepared data folder; DataError (saying how to prepare it) otherwise."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: {MANIFEST_FILE} is missing, so {data_dir} holds no prepared data; {_prepare_hint(data_dir)}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        _check_fields(manifest)
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"{path} is corrupt ({err}); {_prepare_hint(data_dir)}") from err
    tokenizer = data_dir / TOKENIZER_FILE
    if not tokenizer.is_file() or _sha256(tokenizer.read_bytes()) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"{tokenizer} is missing or not the tokenizer the shards were made with; {_prepare_hint(data_dir)}"
        )
    for split in SPLITS:
        open_tokens(data_dir, manifest, split, verify=False)  # raises, naming the file, when missing or cut short
    return manifest


def longest_document(manifest: dict[str, Any]) -> int:
    """Tokens (without EOT) of the longest document of any split: the largest useful ``model.seq_len``."""
    return max(int(entry["max_document_tokens"]) for entry in manifest["splits"].values())


def _check_fields(manifest: Any) -> None:
    """Every field the loaders read is present and of its type (a damaged or hand-edited manifest is refused here,
    not by a TypeError deep in a loader); shard files are plain names inside the data folder."""
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in REQUIRED if key not in manifest]
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ValueError("splits is not an object")
    for split in SPLITS:
        if not isinstance(splits.get(split), dict):
            raise ValueError(f"splits.{split} is missing or not an object")
        missing += [f"splits.{split}.{key}" for key in SPLIT_REQUIRED if key not in splits[split]]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if manifest["format_version"] not in READABLE_VERSIONS or isinstance(manifest["format_version"], bool):
        raise ValueError(f"format_version {manifest['format_version']!r}, this version reads {READABLE_VERSIONS}")
    _expect(_count(manifest["vocab_size"]) and manifest["vocab_size"] > 0, "vocab_size", manifest["vocab_size"])
    _expect(_count(manifest["eot_id"]) and manifest["eot_id"] < manifest["vocab_size"], "eot_id", manifest["eot_id"])
    _expect(manifest["dtype"] in DTYPES, "dtype", manifest["dtype"])
    _expect(isinstance(manifest["tokenizer_sha256"], str), "tokenizer_sha256", manifest["tokenizer_sha256"])
    for split in SPLITS:
        entry = splits[split]
        for key in ("documents", "tokens", "bytes", "max_document_tokens"):
            _expect(_count(entry[key]), f"splits.{split}.{key}", entry[key])
        _expect(isinstance(entry["sha256"], str), f"splits.{split}.sha256", entry["sha256"])
        shards = entry.get("shards", [])
        _expect(isinstance(shards, list), f"splits.{split}.shards", shards)
        for i, shard in enumerate(shards):
            where = f"splits.{split}.shards[{i}]"
            _expect(isinstance(shard, dict) and {"file", "tokens", "sha256"} <= shard.keys(), where, shard)
            _expect(
                isinstance(shard["file"], str)
                and shard["file"] == Path(shard["file"]).name
                and shard["file"] not in ("", ".", ".."),
                f"{where}.file",
                shard["file"],
            )
            _expect(_count(shard["tokens"]), f"{where}.tokens", shard["tokens"])
            _expect(isinstance(shard["sha256"], str), f"{where}.sha256", shard["sha256"])


DTYPES = ("<u2", "<u4")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _expect(ok: bool, field: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field} = {str(value)[:60]!r} is not what a prepared folder holds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _prepare_hint(data_dir: Path) -> str:
    return f"prepare it with `hecate prepare-data --input stdlib|PATH... --out {data_dir}`"
