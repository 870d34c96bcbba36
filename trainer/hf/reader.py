"""A local Hugging Face model folder, read lazily and checked: ``config.json``, ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``, and ``tokenizer.json``.

Tensors are read one at a time through safetensors' ``safe_open`` (memory-mapped): a caller holds only what it
asked for, and ``rows`` reads a slice of a tensor's first dim (``get_slice``) without the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hecate.trainer.errors import HfFormatError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


class HfFolder:
    """The tensors of one folder by name; every failure names the file and tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HfFormatError(f"{self.path}: not a folder (a Hugging Face model folder holds {CONFIG_FILE})")
        self.config: dict[str, Any] = self._json(CONFIG_FILE)
        self.where: dict[str, str] = self._weight_map()  # tensor name -> file name
        self._open: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name, None, None)

    def rows(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of the tensor's first dim (all with None), read without the others."""
        try:
            return self._slice(name)[start:stop].to(torch.float32)
        except (SafetensorError, OSError, ValueError) as err:
            raise HfFormatError(f"{self.path / self.where[name]}: cannot read tensor {name!r}: {err}") from None

    def tokenizer_file(self) -> Path:
        """tokenizer.json, checked to load with ``tokenizers`` (a sentencepiece-only folder is refused)."""
        from tokenizers import Tokenizer

        path = self.path / TOKENIZER_FILE
        if not path.is_file():
            raise HfFormatError(
                f"{path}: missing; Hecate reads a fast tokenizer's {TOKENIZER_FILE} (save the tokenizer with "
                f"transformers' AutoTokenizer.from_pretrained(...).save_pretrained(...) to write one)"
            )
        try:
            Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception for every malformed file
            raise HfFormatError(f"{path}: not a tokenizer the tokenizers library reads: {err}") from None
        return path

    def _slice(self, name: str):
        if name not in self.where:
            raise HfFormatError(f"{self.path}: no tensor {name!r} in {self._weights_files()}")
        file = self.where[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.path / file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise HfFormatError(f"{self.path / file}: not a readable safetensors file: {err}") from None
        try:
            return self._open[file].get_slice(name)
        except (SafetensorError, OSError) as err:
            raise HfFormatError(f"{self.path / file}: tensor {name!r} missing or unreadable: {err}") from None

    def _weights_files(self) -> str:
        return INDEX_FILE if (self.path / INDEX_FILE).is_file() else SINGLE_FILE

    def _weight_map(self) -> dict[str, str]:
        """Tensor -> file, from the index (every shard it lists must exist) or the single file's header."""
        if (self.path / INDEX_FILE).is_file():
            weight_map = self._json(INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HfFormatError(f"{self.path / INDEX_FILE}: no 'weight_map' of tensor names to shard files")
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise HfFormatError(f"{self.path / file}: missing shard (listed in {INDEX_FILE})")
            return dict(weight_map)
        if not (self.path / SINGLE_FILE).is_file():
            raise HfFormatError(f"{self.path}: no {SINGLE_FILE} and no {INDEX_FILE} (weights in safetensors only)")
        try:
            with safe_open(str(self.path / SINGLE_FILE), framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise HfFormatError(f"{self.path / SINGLE_FILE}: not a readable safetensors file: {err}") from None

    def _json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        if not path.is_file():
            raise HfFormatError(f"{path}: missing (a Hugging Face model folder holds {name})")
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise HfFormatError(f"{path}: not readable JSON: {err}") from None
        if not isinstance(data, dict):
            raise HfFormatError(f"{path}: must hold a JSON object")
        return data
