"""Shared fixtures: a small real corpus (a few folders of the Python standard library), prepared once."""

import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small enough to prepare in seconds, real enough to learn from: a few packages of the standard library.
SMALL_CORPUS = [str(STDLIB / name) for name in ("json", "email", "logging", "concurrent")]
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    from hecate.trainer.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "small"
    prepare_data(SMALL_CORPUS, out, vocab_size=SMALL_VOCAB, val_fraction=0.2, log=lambda _: None)
    return out
