"""Data: corpus -> tokenizer -> token shards -> manifest (``prepare_data``), and the loaders that read them.

    corpus.py     which inputs hold which documents, as units of work (files, row groups, dataset rows)
    readers.py    a unit's documents as bounded pieces: text files, JSONL(.gz), Parquet, `datasets` folders
    pieces.py     where a long text is cut before the tokenizer
    tokenizer.py  byte-level BPE with one special token (EOT), a pretrained one, and bytes per token
    passes.py     the two passes over the corpus (digests, then tokens), on every core
    shards.py     the flat uint16/uint32 token shards, memory-mapped, checked when opened
    manifest.py   manifest.json: what a prepared folder holds; loading checks it is complete
    prepare.py    the pipeline, streamed, deterministic and written atomically
    loader.py     TrainLoader (random windows, a pure function of seed and step), ValLoader (fixed windows)
"""
from hecate.trainer.data.corpus import list_units
from hecate.trainer.data.loader import TrainLoader, ValLoader
from hecate.trainer.data.manifest import MANIFEST_FILE, load_manifest, longest_document
from hecate.trainer.data.prepare import gzip9_bits_per_byte, prepare_data
from hecate.trainer.data.shards import ShardedTokens, open_tokens
from hecate.trainer.data.tokenizer import EOT, TOKENIZER_FILE, load_tokenizer, pretrained_tokenizer, token_bytes

__all__ = [
    "EOT", "MANIFEST_FILE", "TOKENIZER_FILE", "ShardedTokens", "TrainLoader", "ValLoader", "gzip9_bits_per_byte",
    "list_units", "load_manifest", "load_tokenizer", "longest_document", "open_tokens", "prepare_data",
    "pretrained_tokenizer", "token_bytes",
]
