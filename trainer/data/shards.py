"""Token shards: one flat file per split (``train.bin``, ``val.bin``) of little-endian uint16 token ids, every
document followed by EOT. Flat and memory-mapped, so a loader reads any window without loading the split.

Legend: N = tokens in a split, D = documents in a split.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from hecate.collectives.errors import DataError

DTYPE = "<u2"
SPLITS = ("train", "val")
ENCODE_CHUNK_DOCS = 256  # documents per encode_batch call: bounds the memory of the Encoding objects


def shard_file(split: str) -> str:
    return f"{split}.bin"


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_N, lengths_D): the documents' ids, each followed by EOT, and each document's length without EOT."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets (>= 0.20)
    ids_D: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK_DOCS):
        ids_D += [encoding.ids for encoding in encode(list(texts[start:start + ENCODE_CHUNK_DOCS]),
                                                      add_special_tokens=False)]
    lengths_D = np.array([len(ids) for ids in ids_D], dtype=np.int64)
    tokens_N = np.full(int(lengths_D.sum()) + len(ids_D), eot_id, dtype=DTYPE)
    ends_D = np.cumsum(lengths_D + 1) - 1  # where each document's EOT sits
    for ids, end, length in zip(ids_D, ends_D, lengths_D):
        tokens_N[end - length:end] = ids
    return tokens_N, lengths_D


def open_tokens(data_dir: str | os.PathLike, manifest: dict[str, Any], split: str) -> np.memmap:
    """tokens_N of a split, memory-mapped read-only; the file must hold exactly the manifest's token count."""
    if split not in manifest["splits"]:
        raise DataError(f"no split {split!r} in {data_dir}; it has {sorted(manifest['splits'])}")
    path = Path(data_dir) / shard_file(split)
    tokens = int(manifest["splits"][split]["tokens"])
    itemsize = np.dtype(manifest["dtype"]).itemsize
    size = path.stat().st_size if path.is_file() else None
    if size != tokens * itemsize:
        found = "is missing" if size is None else f"holds {size} bytes"
        raise DataError(f"{path} {found}, but the manifest says {tokens} tokens ({tokens * itemsize} bytes): "
                        f"prepare the data again with `hecate prepare-data --out {data_dir}`")
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(tokens,))
