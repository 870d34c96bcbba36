"""Cut text into bounded pieces before it reaches the tokenizer.

A BPE tokenizer's time and memory grow with the longest run it must treat as one word: a 10 MB line with no
spaces took minutes to train on and gigabytes to encode. Every text is therefore fed in pieces of at most
``PIECE_CHARS`` characters. A piece ends where a non-space character is followed by a space, tab or newline:
every GPT-style pre-tokenizer (byte-level BPE included) starts a new word there, so for ordinary text the
tokens are exactly those of the whole text. Only a run of more than ``PIECE_CHARS`` characters without such a
place is cut mid-word; such a piece is one over-long "word", which the tokenizer trainer skips (``is_trainable``):
every merge rescans every word that holds its pair, so a blob of random characters would cost minutes per
megabyte to train on. It is still encoded like any other piece.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

PIECE_CHARS = 1024  # the longest word the tokenizer trainer sees; 64 Ki made training on 1 MB take 50 s
# The longest prefix that ends with a non-space character followed by ASCII whitespace (the lookahead).
_LAST_WORD_END = re.compile(r"(?s).*\S(?=[ \t\n\r])")
_WORD_END = re.compile(r"\S[ \t\n\r]")


def cut_pieces(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """The text made of ``chunks`` (any split, e.g. blocks of a file) as pieces of at most ``limit`` characters.

    The cuts depend only on the text, not on how it arrives in chunks."""
    buffer, start = "", 0
    for chunk in chunks:
        buffer = buffer[start:] + chunk
        start = 0
        while len(buffer) - start > limit:
            end = _cut(buffer, start, limit)
            yield buffer[start:end]
            start = end
    if len(buffer) > start:
        yield buffer[start:]


def _cut(buffer: str, start: int, limit: int) -> int:
    """Where the piece starting at ``start`` ends: after the last word end within ``limit + 1`` characters."""
    found = _LAST_WORD_END.match(buffer, start, start + limit + 1)
    return found.end() if found else start + limit


def is_trainable(piece: str, limit: int = PIECE_CHARS) -> bool:
    """False for a piece that is one run of ``limit`` characters without a word end: what a cut mid-word leaves."""
    return len(piece) < limit or _WORD_END.search(piece) is not None
