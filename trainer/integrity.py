"""What makes a checkpoint folder trustworthy: a SHA-256 checksum of every file, and file names that stay in it.

The checksums live in ``SHA256SUMS``, in the format of coreutils ``sha256sum``, so that
``cd step_XXXXXXXX && sha256sum -c SHA256SUMS`` checks a checkpoint without Hecate. SHA-256 because it is in the
standard library, runs at about 1 GB/s on one core with SHA instructions (``benchmarks/checksums.py``, results in
docs/BENCHMARKS.md: faster than BLAKE2b there; CRC32 is twice as fast but has 32 bits, SHA-1 a little faster but
is deprecated) and leaves no chance for damage to go unnoticed.
The ranks share the hashing, each a slice of the files, so it takes a checkpoint's size over the ranks' total speed.
A checksum finds damage (flipped bits, truncation, a replaced or
missing file), not forgery: whoever can rewrite a file can rewrite the manifest too, which is why the checkpoint
reader (trainer/safe_reader.py) never unpickles anything but plain data either way.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from hecate.parallel.errors import CheckpointError

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")  # sha256sum's "<hex>  <name>" (or " *<name>" in binary mode)


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint whose save never finished (no ``COMPLETE`` marker): skipped, never loaded."""


class CorruptCheckpoint(CheckpointError):
    """A complete checkpoint with a damaged, missing or unexpected file; ``file`` names it."""

    def __init__(self, path: Path, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"checkpoint {path} is corrupt: {file} {reason}")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def write_manifest(folder: Path, digests: dict[str, str]) -> None:
    """Write ``SHA256SUMS`` atomically (a temporary file, flushed to disk, then renamed): it is there whole or not
    at all."""
    text = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of every file the manifest lists; a missing or garbled manifest is corrupt."""
    try:
        lines = (folder / MANIFEST).read_text().splitlines()
    except FileNotFoundError:
        raise CorruptCheckpoint(folder, MANIFEST, "is missing (no checksums to check the files against)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(folder, MANIFEST, f"is unreadable ({err})") from None
    digests = {}
    for number, line in enumerate(lines, 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise CorruptCheckpoint(folder, MANIFEST, f"line {number} is not '<sha256>  <file>'")
        digest, name = match.groups()
        check_file_name(folder, name, MANIFEST)
        digests[name] = digest
    return digests


def check_file_name(folder: Path, name: str, listed_in: str) -> Path:
    """``folder / name`` when ``name`` is a plain file name in ``folder``; a path that leaves the folder (``..``,
    an absolute path, a sub-folder, a symbolic link) is corrupt, named after the file that ``listed_in`` it."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CorruptCheckpoint(folder, listed_in, f"names {name!r}, which is not a file inside the checkpoint")
    path = folder / name
    if path.is_symlink():
        raise CorruptCheckpoint(folder, name, "is a symbolic link (a checkpoint holds its own files)")
    return path


def check_files(folder: Path, digests: dict[str, str]) -> None:
    """Every file in ``digests`` exists and has its checksum; the first that does not is named."""
    for name, digest in digests.items():
        path = check_file_name(folder, name, MANIFEST)
        if not path.is_file():
            raise CorruptCheckpoint(folder, name, "is missing")
        try:
            found = file_sha256(path)
        except OSError as err:
            raise CorruptCheckpoint(folder, name, f"is unreadable ({err.strerror})") from None
        if found != digest:
            raise CorruptCheckpoint(
                folder,
                name,
                f"does not match its checksum in {MANIFEST} "
                f"({path.stat().st_size} bytes, sha256 {found[:12]}..., "
                f"expected {digest[:12]}...)",
            )
