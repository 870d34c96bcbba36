"""Token shards: each split is a sequence of flat files (``train-00000.bin``, ...) of little-endian token ids
(uint16 when the vocabulary fits, else uint32), every document followed by EOT. A split is the concatenation
of its shards; loaders memory-map them and read any window without loading a split.

Opening a split checks what the manifest promises, once, in bounded memory: each shard's size, its sha256,
and that every id is below the vocabulary size - so a damaged shard is one line naming it, not a wrong
loss or an IndexError deep inside the model.

Legend: N = tokens in a split, K = shards of a split.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hecate.trainer.errors import DataError

SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB (uint16) or 256 MiB (uint32) a shard
CHECK_TOKENS = 1 << 24  # tokens hashed and range-checked at a time when a split is opened
UINT16_VOCAB = 1 << 16


def token_dtype(vocab_size: int) -> str:
    """The narrowest little-endian unsigned type that holds every id of the vocabulary."""
    return "<u2" if vocab_size <= UINT16_VOCAB else "<u4"


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def shard_entries(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """[{file, tokens, sha256}] of a split; a format-1 folder has one file per split, ``train.bin``."""
    entry = manifest["splits"][split]
    if "shards" in entry:
        return entry["shards"]
    return [{"file": f"{split}.bin", "tokens": entry["tokens"], "sha256": entry["sha256"]}]


class ShardWriter:
    """Appends a split's tokens, starting a new shard every ``shard_tokens``; hashes what it writes."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int = SHARD_TOKENS):
        self.folder, self.split, self.itemsize = folder, split, np.dtype(dtype).itemsize
        self.shard_bytes = shard_tokens * self.itemsize
        self.shards: list[dict[str, Any]] = []
        self.split_hash = hashlib.sha256()
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._written = 0

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data)
        while len(data):
            if self._file is None:
                self._file = open(self.folder / shard_file(self.split, len(self.shards)), "wb")  # noqa: SIM115
                self._hash, self._written = hashlib.sha256(), 0
            part = data[:self.shard_bytes - self._written]
            self._file.write(part)
            self._hash.update(part)
            self.split_hash.update(part)
            self._written += len(part)
            data = data[len(part):]
            if self._written == self.shard_bytes:
                self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        """[{file, tokens, sha256}] of the shards written."""
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        self._file.close()
        self.shards.append({"file": shard_file(self.split, len(self.shards)), "tokens": self._written // self.itemsize,
                            "sha256": self._hash.hexdigest()})
        self._file = None


class ShardedTokens:
    """tokens_N of a split as one read-only sequence over its memory-mapped shards."""

    def __init__(self, shards_K: list[np.ndarray]):
        self.shards_K = shards_K
        self.offsets_K1 = np.cumsum([0] + [len(shard) for shard in shards_K])
        self.size = int(self.offsets_K1[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        """tokens_N[index] for an integer array of any shape; windows may run across shards."""
        flat = np.asarray(index, dtype=np.int64).ravel()
        shard_of = np.searchsorted(self.offsets_K1, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.shards_K[0].dtype)
        for k in np.unique(shard_of):
            mine = shard_of == k
            out[mine] = self.shards_K[k][flat[mine] - self.offsets_K1[k]]
        return out.reshape(np.shape(index))

    def to_numpy(self) -> np.ndarray:
        """The whole split in memory (tests and small tools)."""
        return np.concatenate(self.shards_K)


def open_tokens(data_dir: str | os.PathLike, manifest: dict[str, Any], split: str, verify: bool = True
                ) -> ShardedTokens:
    """A split's shards, memory-mapped read-only. Each must hold exactly the manifest's token count and,
    with ``verify``, its sha256 and only ids below ``vocab_size``; DataError naming the shard otherwise."""
    if split not in manifest["splits"]:
        raise DataError(f"no split {split!r} in {data_dir}; it has {sorted(manifest['splits'])}")
    shards_K = []
    for entry in shard_entries(manifest, split):
        path = Path(data_dir) / entry["file"]
        tokens = int(entry["tokens"])
        itemsize = np.dtype(manifest["dtype"]).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * itemsize:
            found = "is missing" if size is None else f"holds {size} bytes"
            raise DataError(f"{path} {found}, but the manifest says {tokens} tokens ({tokens * itemsize} bytes): "
                            f"prepare the data again with `hecate prepare-data --out {data_dir}`")
        tokens_N = np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(tokens,)) if tokens else \
            np.empty(0, dtype=manifest["dtype"])
        if verify:
            _verify(path, tokens_N, entry["sha256"], int(manifest["vocab_size"]), data_dir)
        shards_K.append(tokens_N)
    return ShardedTokens(shards_K)


def _verify(path: Path, tokens_N: np.ndarray, sha256: str, vocab_size: int, data_dir) -> None:
    """One pass in chunks: the sha256 the manifest recorded, and the largest id."""
    digest, largest = hashlib.sha256(), 0
    for start in range(0, len(tokens_N), CHECK_TOKENS):
        chunk = np.asarray(tokens_N[start:start + CHECK_TOKENS])
        digest.update(chunk.tobytes())
        largest = max(largest, int(chunk.max()))
    if digest.hexdigest() != sha256:
        raise DataError(f"{path} does not match the sha256 in its manifest (the shard changed after it was "
                        f"written); prepare the data again with `hecate prepare-data --out {data_dir}`")
    if largest >= vocab_size:
        raise DataError(f"{path} holds token id {largest}, outside the vocabulary of {vocab_size} tokens; "
                        f"prepare the data again with `hecate prepare-data --out {data_dir}`")
