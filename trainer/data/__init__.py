"""Data: corpus -> tokenizer -> token shards -> manifest (``prepare_data``), and the loaders that read them.

    corpus.py     which files, named how, which are skipped
    tokenizer.py  byte-level BPE with one special token (EOT), and bytes per token for bits per byte
    shards.py     the flat uint16 token files, memory-mapped
    manifest.py   manifest.json: what a prepared folder holds; loading checks it is complete
    prepare.py    the pipeline, deterministic and written atomically
    loader.py     TrainLoader (random windows, a pure function of seed and step), ValLoader (fixed windows)
"""
from hecate.trainer.data.corpus import Document, collect_documents
from hecate.trainer.data.loader import TrainLoader, ValLoader
from hecate.trainer.data.manifest import MANIFEST_FILE, load_manifest, longest_document
from hecate.trainer.data.prepare import gzip9_bits_per_byte, prepare_data
from hecate.trainer.data.shards import open_tokens
from hecate.trainer.data.tokenizer import EOT, TOKENIZER_FILE, load_tokenizer, token_bytes

__all__ = [
    "EOT", "MANIFEST_FILE", "TOKENIZER_FILE", "Document", "TrainLoader", "ValLoader", "collect_documents",
    "gzip9_bits_per_byte", "load_manifest", "load_tokenizer", "longest_document", "open_tokens", "prepare_data",
    "token_bytes",
]
