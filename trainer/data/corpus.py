"""Collect the corpus: the text files named by the inputs, each one document with a stable relative name.

An input is the keyword ``stdlib`` (the ``.py`` files of the running Python's standard library) or a path:
a file (taken whatever its suffix) or a folder (its text files, by suffix, hidden entries skipped).
A document is named after its input's last folder component, ``corpus/pkg/mod_01.py`` for ``corpus/``,
so that names (and hence the train/val split) do not depend on where the corpus sits on disk.

A file the user named must be readable UTF-8: anything else is a DataError naming the file. The standard
library ships a few non-UTF-8 test fixtures on purpose; those are skipped and reported, as are empty files.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from hecate.collectives.errors import DataError

STDLIB = "stdlib"
TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
                 ".js", ".ts", ".java", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".tex", ".html", ".css")
# Installed third-party packages live below the stdlib folder but are not the standard library.
NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One corpus file: its relative name (``corpus/pkg/mod_01.py``) and its exact text."""

    name: str
    text: str


def collect_documents(inputs: Sequence[str]) -> tuple[list[Document], dict[str, str]]:
    """The non-empty documents of ``inputs`` sorted by name, and the skipped files as {name: reason}."""
    if not inputs:
        raise DataError("no corpus inputs given: pass 'stdlib' and/or files or folders")
    documents: dict[str, Document] = {}
    skipped: dict[str, str] = {}
    origin: dict[str, str] = {}  # name -> input, to name both inputs of a clash
    for spec in inputs:
        lenient = spec == STDLIB
        for name, path in _files_of(spec):
            if name in origin:
                raise DataError(f"inputs {origin[name]!r} and {spec!r} both give the corpus file name {name!r}; "
                                f"list each file once (or rename one of the folders)")
            origin[name] = spec
            text, reason = _read_text(path, lenient)
            if reason:
                skipped[name] = reason
            else:
                documents[name] = Document(name, text)
    if not documents:
        raise DataError(f"the corpus of {list(inputs)} is empty: all {len(skipped)} text file(s) were skipped "
                        f"({_summary(skipped)})")
    return [documents[name] for name in sorted(documents)], dict(sorted(skipped.items()))


def _files_of(spec: str) -> list[tuple[str, Path]]:
    """(name, path) of every file an input stands for."""
    if spec == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return [(f"{STDLIB}/{rel}", root / rel) for rel in _walk(root, (".py",), skip_dirs=NOT_STDLIB)]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus input {spec} does not exist (pass 'stdlib' or an existing file or folder)")
    if path.is_file():
        return [(path.resolve().name, path)]
    prefix = path.resolve().name
    files = [(f"{prefix}/{rel}" if prefix else rel, path / rel) for rel in _walk(path, TEXT_SUFFIXES)]
    if not files:
        raise DataError(f"input folder {spec} holds no text files (looked for {' '.join(TEXT_SUFFIXES)})")
    return files


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the files below ``root`` with one of ``suffixes``; hidden entries skipped."""
    skip = set(skip_dirs)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".") and f.endswith(suffixes)]
    return sorted(found)


def _read_text(path: Path, lenient: bool) -> tuple[str, str]:
    """(text, "") or ("", reason to skip). ``lenient`` skips non-UTF-8 files instead of refusing them."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from err
    if not raw:
        return "", "empty"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as err:
        if lenient:
            return "", "not UTF-8"
        raise DataError(f"corpus file {path} is not UTF-8 ({err.reason} at byte {err.start}); "
                        f"convert it to UTF-8 or leave it out of the inputs") from err


def _summary(skipped: dict[str, str], show: int = 5) -> str:
    shown = ", ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:show])
    return shown + (f", ... {len(skipped) - show} more" if len(skipped) > show else "")
