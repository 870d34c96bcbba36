"""Inputs that used to hang, blow up memory or fail with a traceback: each is now bounded, skipped and reported,
or one line naming the file (``hecate prepare-data`` and the loaders).
"""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hecate.trainer.data import TrainLoader, ValLoader, load_manifest, prepare_data
from hecate.trainer.errors import DataError

pytestmark = pytest.mark.slow  # starts processes

QUIET = lambda _: None  # noqa: E731
LONG_LINE_CHARS = 10_000_000
LONG_LINE_SECONDS = 240  # it takes ~20 s here; before pieces, training on it ran for more than 300 s
LONG_LINE_PEAK_RSS_MB = 1500  # ~520 MB here; a 17 MB line used to peak at 3.6 GB


def _prose(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"note_{i}.txt").write_text(f"Note {i}: the router sends each token to two experts. " * 20)
    return root


def _prepare_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hecate.launch.cli", "prepare-data", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hecate: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --- prepare-data ---


def test_a_long_line_without_separators_prepares_in_bounded_time_and_memory(tmp_path):
    corpus = _prose(tmp_path / "c")
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    (corpus / "big.txt").write_bytes(rng.choice(letters, LONG_LINE_CHARS).tobytes())  # in train (name hash)
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            wrapper,
            sys.executable,
            "-m",
            "hecate.launch.cli",
            "prepare-data",
            "--input",
            str(corpus),
            "--out",
            str(tmp_path / "data"),
            "--vocab-size",
            "1000",
            "--val-fraction",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=LONG_LINE_SECONDS,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.splitlines()[-1]) < LONG_LINE_PEAK_RSS_MB
    train = load_manifest(tmp_path / "data")["splits"]["train"]
    assert "c/big.txt" in train["files"] and train["bytes"] > LONG_LINE_CHARS


def test_a_fifo_named_txt_is_skipped_not_waited_on(tmp_path):
    corpus = _prose(tmp_path / "c")
    os.mkfifo(corpus / "pipe.txt")  # opening it for reading would block until a writer comes: forever
    proc = _prepare_cli("--input", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "c/pipe.txt: not a regular file" in proc.stdout
    assert load_manifest(tmp_path / "data")["skipped_files"] == {"c/pipe.txt": "not a regular file"}


def test_a_corrupt_parquet_file_is_one_line_naming_it(tmp_path):
    corpus = _prose(tmp_path / "c")
    (corpus / "rows.parquet").write_bytes(b"PAR1" + b"\x07" * 100 + b"PAR1")
    line = _one_line_error(_prepare_cli("--input", str(corpus), "--out", str(tmp_path / "data")))
    assert f"Parquet file {corpus / 'rows.parquet'} is corrupt" in line
    assert not (tmp_path / "data").exists()


def test_jsonl_without_the_text_field_is_one_line_naming_the_field(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"content": f"text {i}"}) for i in range(5)) + "\n")
    line = _one_line_error(_prepare_cli("--input", str(corpus), "--out", str(tmp_path / "data")))
    assert "is empty" in line and "c/a.jsonl: 5 no string field 'text'" in line
    proc = _prepare_cli(
        "--input", str(corpus), "--out", str(tmp_path / "data"), "--text-field", "content", "--vocab-size", "300"
    )
    assert proc.returncode == 0, proc.stderr


def test_a_truncated_gzip_file_is_skipped_and_reported(tmp_path):
    corpus = _prose(tmp_path / "c")
    whole = gzip.compress(b"".join(json.dumps({"text": f"record {i} " * 50}).encode() + b"\n" for i in range(200)))
    (corpus / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    manifest = prepare_data([str(corpus)], tmp_path / "data", vocab_size=300, log=QUIET)
    assert manifest["skipped_files"]["c/cut.jsonl.gz"].startswith("unreadable")
    files = manifest["splits"]["train"]["files"] + manifest["splits"]["val"]["files"]
    assert "c/cut.jsonl.gz" not in files  # all of it, not the records before the cut


# --- loading: shards are checked against the manifest ---


@pytest.fixture
def data(tmp_path) -> Path:
    out = tmp_path / "data"
    prepare_data([str(_prose(tmp_path / "c", n=8))], out, vocab_size=300, val_fraction=0.25, log=QUIET)
    return out


def test_a_changed_shard_is_one_line_naming_it(data):
    shard = data / "train-00000.bin"
    tokens = bytearray(shard.read_bytes())
    tokens[10] ^= 1  # same size, one id changed: only the sha256 can tell
    shard.write_bytes(bytes(tokens))
    with pytest.raises(DataError, match=r"train-00000.bin does not match the sha256 in its manifest"):
        TrainLoader(data, seq_len=8, global_batch=2)
    ValLoader(data, seq_len=8, batch_size=1, max_batches=1)  # the val split is intact


def test_a_shard_of_out_of_vocabulary_ids_is_one_line_naming_it(data):
    """A shard whose manifest entry agrees with it (so not a copy error) but whose ids the model cannot embed."""
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"]["val"]
    bad = np.full(entry["tokens"], manifest["vocab_size"] + 7, dtype=manifest["dtype"]).tobytes()
    (data / "val-00000.bin").write_bytes(bad)
    entry["shards"][0]["sha256"] = entry["sha256"] = hashlib.sha256(bad).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError,
        match=rf"val-00000.bin holds token id {manifest['vocab_size'] + 7}, outside "
        rf"the vocabulary of {manifest['vocab_size']} tokens",
    ):
        ValLoader(data, seq_len=8, batch_size=1, max_batches=1)
