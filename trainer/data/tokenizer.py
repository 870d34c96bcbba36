"""Byte-level BPE (HF ``tokenizers``): every byte sequence is encodable, decoding is lossless, and each token
stands for a whole number of bytes - which is what bits per byte needs. ``prepare-data`` trains one, or takes
a pretrained one (``--tokenizer``: a ``tokenizer.json`` or a Hugging Face folder) whose end-of-text token then
ends the documents.

Legend: V = vocabulary size.

One special token, EOT, ends every document in the shards. It is only ever inserted by the data pipeline:
the text ``<|endoftext|>`` inside a file stays text (``encode_special_tokens``), so counting EOT tokens
counts documents, and no file can forge a document boundary.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hecate.trainer.errors import DataError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + 1  # every byte, and EOT
MAX_VOCAB = 2**32  # token ids are stored as uint16, or uint32 above 65,536
HF_CONFIG_FILE = "tokenizer_config.json"


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB} (the 256 bytes and EOT) and at most {MAX_VOCAB} "
                        f"(token ids are stored as uint32), got {vocab_size}")


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Largest id + 1: the rows an embedding needs (a pretrained vocabulary may have gaps)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def pretrained_tokenizer(path: str | os.PathLike) -> tuple[str, int]:
    """(tokenizer.json text, end-of-text id) of a ``tokenizer.json`` file or a Hugging Face tokenizer folder.

    The end of text is ``<|endoftext|>`` when the vocabulary has it, else the folder's ``eos_token``
    (``tokenizer_config.json``). A folder without ``tokenizer.json`` is converted by ``transformers``."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        json_text = path.read_text(encoding="utf-8")
    elif (path / TOKENIZER_FILE).is_file():
        json_text = (path / TOKENIZER_FILE).read_text(encoding="utf-8")
    elif path.is_dir():
        json_text = _converted_by_transformers(path)
    else:
        raise DataError(f"tokenizer {path} does not exist (pass a tokenizer.json or a Hugging Face tokenizer folder)")
    try:
        tokenizer = tokenizer_from_str(json_text)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"tokenizer {path} is not a tokenizer.json the tokenizers library reads ({err})") from err
    candidates = [EOT] + _eos_of(folder / HF_CONFIG_FILE)
    for token in candidates:
        if tokenizer.token_to_id(token) is not None:
            return json_text, tokenizer.token_to_id(token)
    raise DataError(f"tokenizer {path} has no end-of-text token (looked for {', '.join(candidates)}); "
                    f"give its folder an {HF_CONFIG_FILE} with an eos_token")


def _converted_by_transformers(folder: Path) -> str:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise DataError(f"tokenizer folder {folder} has no {TOKENIZER_FILE}; converting it needs transformers "
                        f"(pip install -e '.[hf]')") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return tokenizer.backend_tokenizer.to_str()
    except Exception as err:  # transformers raises many types for folders it cannot read
        raise DataError(f"tokenizer folder {folder} has no {TOKENIZER_FILE} and transformers cannot load it "
                        f"({err})") from err


def _eos_of(config_path: Path) -> list[str]:
    """The eos_token of a tokenizer_config.json (a string or {"content": ...}), if there is one."""
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return []
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return [eos] if isinstance(eos, str) else []


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
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
    tokenizer.train_from_iterator(texts, trainer)
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
    bytes_V = np.zeros(vocab_size_of(tokenizer), dtype=np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if not set(token) <= alphabet:
            raise DataError(f"tokenizer {tokenizer_path} is not byte-level (token {token!r}); prepare the data again")
        bytes_V[index] = len(token)
    return bytes_V
