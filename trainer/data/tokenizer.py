"""Byte-level BPE (HF ``tokenizers``): every byte sequence is encodable, decoding is lossless, and each token
stands for a whole number of bytes - which is what bits per byte needs.

Legend: V = vocabulary size.

One special token, EOT, ends every document in the shards. It is only ever inserted by the data pipeline:
the text ``<|endoftext|>`` inside a file stays text (``encode_special_tokens``), so counting EOT tokens
counts documents, and no file can forge a document boundary.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hecate.collectives.errors import DataError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + 1  # every byte, and EOT
MAX_VOCAB = 2**16  # token ids are stored as uint16


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB} (the 256 bytes and EOT) and at most {MAX_VOCAB} "
                        f"(token ids are stored as uint16), got {vocab_size}")


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with EOT as id 0, trained on ``texts``.

    The result is the same in every process and for any thread count: merges are chosen by (count, pair)
    with a total order, and the serialized vocabulary is ordered by id (tests/test_data.py checks it).
    A small corpus may run out of pairs to merge before ``vocab_size``: the vocabulary is then smaller.
    """
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared data folder (or its ``tokenizer.json``), encoding ``<|endoftext|>`` as text."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"tokenizer {path} is missing: prepare the data with `hecate prepare-data`")
    return tokenizer_from_str(path.read_text(encoding="utf-8"))


def tokenizer_from_str(json_text: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(json_text)
    tokenizer.encode_special_tokens = True  # not serialized: set on every load
    return tokenizer


def token_bytes(tokenizer_path: str | os.PathLike) -> np.ndarray:
    """bytes_V: how many UTF-8 bytes each token stands for (0 for EOT), so that bits per byte of a token
    stream is nats / (ln 2 * bytes_V[targets].sum()), whatever the tokenizer."""
    tokenizer = load_tokenizer(tokenizer_path)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # one character per byte
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    bytes_V = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if not set(token) <= alphabet:
            raise DataError(f"tokenizer {tokenizer_path} is not byte-level (token {token!r}); prepare the data again")
        bytes_V[index] = len(token)
    return bytes_V
