"""Data: corpus -> tokenizer -> shards -> manifest, and the loaders that read them.

Most tests use a small synthetic corpus (python-ish files written to a tmp folder, vocab 400) prepared
once per module; one uses the stdlib slice from conftest, one lists the whole stdlib without tokenizing.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from hecate.collectives.errors import ConfigError
from hecate.trainer.data import (
    EOT,
    TrainLoader,
    ValLoader,
    load_manifest,
    load_tokenizer,
    longest_document,
    open_tokens,
    prepare_data,
    token_bytes,
)
from hecate.trainer.data.corpus import list_units
from hecate.trainer.errors import DataError

VOCAB = 400
N_FILES = 30
WORDS = ["alpha", "beta", "gamma", "delta", "count", "total", "value", "index", "window", "expert", "router"]
QUIET = lambda _: None  # noqa: E731


def _write_corpus(root: Path) -> Path:
    """30 small python-ish files, one with non-ASCII text, one with a literal EOT string, one empty."""
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    for i in range(N_FILES):
        lines = [f'"""Module {i}: résumé of {WORDS[i % len(WORDS)]} - 数据 ✓."""']
        for j in range(int(rng.integers(3, 12 if i else 60))):  # file 0 is the longest
            a, b = rng.choice(WORDS, 2)
            lines += [f"def {a}_{j}({b}, n={j}):", f"    return {b} * n + {int(rng.integers(100))}", ""]
        (corpus / ("pkg" if i % 3 else ".") / f"mod_{i:02d}.py").write_text("\n".join(lines), encoding="utf-8")
    (corpus / "notes.md").write_text(f"# Notes\nA model ends a text with {EOT} - here it is only text.\n")
    (corpus / "empty.py").write_text("")
    (corpus / "image.png").write_bytes(b"\x89PNG\x00\xff")  # not a text suffix: never read
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data([str(corpus)], out, vocab_size=VOCAB, val_fraction=0.2, log=QUIET)
    return out


def _texts(corpus: Path, names: list[str]) -> list[str]:
    return [(corpus.parent / name).read_text(encoding="utf-8") for name in names]


def _tokens(data: Path, split: str) -> np.ndarray:
    """A split's tokens, all shards, in memory."""
    return open_tokens(data, load_manifest(data), split).to_numpy()


def _data_files(data: Path) -> list[str]:
    names = sorted(p.name for p in data.iterdir())
    assert {"tokenizer.json", "manifest.json", "train-00000.bin", "val-00000.bin"} <= set(names)
    return names


# --- prepare: determinism, split, manifest ---


def test_preparing_twice_gives_identical_bytes(data, corpus, tmp_path):
    again = tmp_path / "again"
    prepare_data([str(corpus)], again, vocab_size=VOCAB, val_fraction=0.2, log=QUIET)
    assert _data_files(again) == _data_files(data)
    for name in _data_files(data):
        assert (again / name).read_bytes() == (data / name).read_bytes(), name


def test_another_process_with_one_thread_gives_identical_bytes(data, corpus, tmp_path):
    """Rust hash maps are seeded per process and training is threaded: check neither leaks into the output."""
    out = tmp_path / "one_thread"
    code = (
        "import sys; from hecate.trainer.data.prepare import prepare_data; "
        f"prepare_data([sys.argv[1]], sys.argv[2], vocab_size={VOCAB}, val_fraction=0.2, log=lambda _: None)"
    )
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code, str(corpus), str(out)], env=env, check=True, timeout=60)
    assert _data_files(out) == _data_files(data)
    for name in _data_files(data):
        assert (out / name).read_bytes() == (data / name).read_bytes(), name


def test_preparing_into_a_prepared_folder_replaces_it(data, corpus, tmp_path):
    out = tmp_path / "out"
    prepare_data([str(corpus / "pkg")], out, vocab_size=300, log=QUIET)
    manifest = prepare_data([str(corpus)], out, vocab_size=VOCAB, val_fraction=0.2, log=QUIET)
    assert load_manifest(out) == manifest
    assert (out / "train-00000.bin").read_bytes() == (data / "train-00000.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_split_is_by_file_and_both_splits_have_files(data):
    splits = load_manifest(data)["splits"]
    train, val = set(splits["train"]["files"]), set(splits["val"]["files"])
    assert train and val and not train & val
    assert len(train | val) == N_FILES + 1  # the 30 modules and notes.md
    assert all(name.startswith("corpus/") for name in train | val)


def test_empty_and_binary_files_are_skipped_and_reported(data):
    assert load_manifest(data)["skipped_files"] == {"corpus/empty.py": "empty", "corpus/image.png": "binary"}


def test_manifest_counts_match_the_shards(data, corpus):
    manifest = load_manifest(data)
    assert manifest["dtype"] == "<u2"
    assert hashlib.sha256((data / "tokenizer.json").read_bytes()).hexdigest() == manifest["tokenizer_sha256"]
    for split, entry in manifest["splits"].items():
        tokens_N = _tokens(data, split)
        assert tokens_N.size == entry["tokens"] == sum(shard["tokens"] for shard in entry["shards"])
        assert hashlib.sha256(tokens_N.tobytes()).hexdigest() == entry["sha256"]
        for shard in entry["shards"]:
            assert hashlib.sha256((data / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        eot_at = np.flatnonzero(tokens_N == manifest["eot_id"])
        assert len(eot_at) == entry["documents"] == len(entry["files"])
        assert eot_at[-1] == tokens_N.size - 1
        assert np.diff(eot_at, prepend=-1).max() - 1 == entry["max_document_tokens"]
        assert entry["bytes"] == sum(len(t.encode("utf-8")) for t in _texts(corpus, entry["files"]))


def test_shards_decode_to_the_exact_file_texts(data, corpus):
    """Byte-level BPE is lossless, and a literal EOT string inside a file stays text (one EOT per document)."""
    manifest = load_manifest(data)
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    for split, entry in manifest["splits"].items():
        ids = _tokens(data, split).tolist()
        decoded = tokenizer.decode(ids, skip_special_tokens=False).split(EOT)[:-1]
        if "corpus/notes.md" in entry["files"]:
            at = entry["files"].index("corpus/notes.md")
            decoded[at : at + 2] = [EOT.join(decoded[at : at + 2])]
        assert decoded == _texts(corpus, entry["files"])


def test_token_bytes_sum_to_the_utf8_bytes_of_the_text(data):
    manifest = load_manifest(data)
    bytes_V = token_bytes(data / "tokenizer.json")
    assert bytes_V.dtype == np.int64 and bytes_V.shape == (manifest["vocab_size"],)
    assert bytes_V[manifest["eot_id"]] == 0
    for split, entry in manifest["splits"].items():
        assert bytes_V[_tokens(data, split)].sum() == entry["bytes"]
    text = "naïve 数据 🙂 <|endoftext|>\tend"
    ids = load_tokenizer(data / "tokenizer.json").encode(text).ids
    assert bytes_V[ids].sum() == len(text.encode("utf-8"))


def test_gzip_bits_per_byte_is_a_plausible_rate(data):
    assert 0.0 < load_manifest(data)["gzip9_val_bpb"] < 8.0


def test_stdlib_slice_prepares_with_real_text(small_data):
    """The conftest corpus: real code, larger vocab - bytes per token above 2 and lossless accounting."""
    manifest = load_manifest(small_data)
    bytes_V = token_bytes(small_data / "tokenizer.json")
    for split, entry in manifest["splits"].items():
        assert entry["bytes"] / entry["tokens"] > 2.0
        assert bytes_V[_tokens(small_data, split)].sum() == entry["bytes"]
    assert 0.0 < manifest["gzip9_val_bpb"] < 8.0


def test_stdlib_input_lists_its_py_files():
    units, skipped = list_units(["stdlib"], "text")
    names = [unit.name for unit in units]
    assert names == sorted(names) and len(names) > 500 and not skipped
    assert all(n.startswith("stdlib/") and n.endswith(".py") and "site-packages" not in n for n in names)
    assert "stdlib/json/decoder.py" in names
    assert all(unit.kind == "text" and unit.lenient for unit in units)


# --- loaders ---


def test_train_batch_depends_only_on_seed_and_step(data):
    loader = TrainLoader(data, seq_len=16, global_batch=8, seed=3)
    inputs_BS, targets_BS = loader.batch(5, 0)
    assert inputs_BS.shape == targets_BS.shape == (8, 16) and inputs_BS.dtype == torch.int64
    assert torch.equal(inputs_BS[:, 1:], targets_BS[:, :-1])
    again = TrainLoader(data, seq_len=16, global_batch=8, seed=3).batch(5, 0)
    assert torch.equal(again[0], inputs_BS) and torch.equal(again[1], targets_BS)
    assert not torch.equal(loader.batch(6, 0)[0], inputs_BS)
    assert not torch.equal(TrainLoader(data, seq_len=16, global_batch=8, seed=4).batch(5, 0)[0], inputs_BS)


def test_train_loader_restored_from_state_gives_the_same_following_batches(data):
    loader = TrainLoader(data, seq_len=16, global_batch=4, grad_accum=2)
    next(loader), next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    restored = TrainLoader(data, seq_len=16, global_batch=4, grad_accum=2)
    restored.load_state_dict(state)
    for want, got in zip(expected, [next(restored) for _ in range(3)]):
        assert all(torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]) for w, g in zip(want, got))


@pytest.mark.parametrize("dp_size,grad_accum", [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_every_layout_sees_the_same_global_rows_per_step(data, dp_size, grad_accum):
    reference_GS = TrainLoader(data, seq_len=16, global_batch=8, seed=1).batch(7, 0)[0]
    loaders = [TrainLoader(data, 16, 8, grad_accum, rank, dp_size, seed=1) for rank in range(dp_size)]
    rows = [loader.batch(7, m)[0] for m in range(grad_accum) for loader in loaders]
    assert all(r.shape == (8 // (dp_size * grad_accum), 16) for r in rows)
    assert torch.equal(torch.cat(rows), reference_GS)


def test_val_windows_are_disjoint_and_the_same_for_every_layout(data):
    manifest = load_manifest(data)
    seq_len = 8
    whole = ValLoader(data, seq_len, batch_size=4, max_batches=3)
    inputs_RS = torch.cat([x for x, _ in whole])
    n_rows = min((manifest["splits"]["val"]["tokens"] - 1) // seq_len, 12)
    assert inputs_RS.shape == (n_rows, seq_len) and len(whole) == -(-n_rows // 4)
    val_N = torch.from_numpy(_tokens(data, "val").astype(np.int64))
    assert torch.equal(inputs_RS.flatten(), val_N[: n_rows * seq_len])  # consecutive, no overlap
    halves = [list(ValLoader(data, seq_len, 4, 3, dp_rank=r, dp_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([x for pair in zip(*halves) for x, _ in pair]), inputs_RS[: n_rows - n_rows % 2])


# --- errors: one DataError (or ConfigError) naming the thing to fix ---


def _corpus_of(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        prepare_data([str(tmp_path / "nowhere")], tmp_path / "out", log=QUIET)


def test_corpus_of_empty_files_is_a_data_error(tmp_path):
    corpus = _corpus_of(tmp_path / "c", {"a.py": b"", "b.txt": b""})
    with pytest.raises(DataError, match="is empty"):
        prepare_data([str(corpus)], tmp_path / "out", log=QUIET)


def test_folder_without_text_files_names_the_folder_and_what_was_skipped(tmp_path):
    corpus = _corpus_of(tmp_path / "pics", {"a.png": b"\x89PNG", "b.bin": b"\x00\x01"})
    with pytest.raises(DataError, match=r"pics.*is empty.*pics/a.png: not UTF-8, pics/b.bin: binary"):
        prepare_data([str(corpus)], tmp_path / "out", log=QUIET)


def test_non_utf8_file_named_by_the_user_names_the_file(tmp_path):
    corpus = _corpus_of(tmp_path / "c", {"good.py": b"x = 1\n", "latin.py": b"caf\xe9 = 1\n"})
    with pytest.raises(DataError, match="latin.py is not UTF-8.*at byte 3"):
        prepare_data([str(corpus / "good.py"), str(corpus / "latin.py")], tmp_path / "out", log=QUIET)


def test_single_file_corpus_cannot_be_split(tmp_path):
    corpus = _corpus_of(tmp_path / "c", {"only.py": b"x = 1\n"})
    with pytest.raises(DataError, match="at least 2"):
        prepare_data([str(corpus / "only.py")], tmp_path / "out", log=QUIET)


def test_failed_prepare_leaves_no_folder_behind(corpus, tmp_path):
    with pytest.raises(DataError, match="vocab_size must be at least 257"):
        prepare_data([str(corpus)], tmp_path / "out", vocab_size=100, log=QUIET)
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_to_overwrite_a_folder_that_is_not_prepared_data(corpus, tmp_path):
    precious = _corpus_of(tmp_path / "mine", {"thesis.txt": b"years of work"})
    with pytest.raises(DataError, match="mine.*not a prepared data folder"):
        prepare_data([str(corpus)], precious, log=QUIET)
    assert (precious / "thesis.txt").read_bytes() == b"years of work"


def test_load_manifest_of_missing_or_corrupt_folder_says_to_prepare(data, tmp_path):
    with pytest.raises(DataError, match="manifest.json is missing.*hecate prepare-data"):
        load_manifest(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in _data_files(data):
        (broken / name).write_bytes((data / name).read_bytes())
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt.*hecate prepare-data"):
        load_manifest(broken)
    (broken / "manifest.json").write_bytes((data / "manifest.json").read_bytes())
    (broken / "val-00000.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="val-00000.bin.*hecate prepare-data"):
        load_manifest(broken)


def test_seq_len_beyond_a_split_names_seq_len_and_the_split_size(data):
    val_tokens = load_manifest(data)["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=rf"model.seq_len={val_tokens}.*val split has only {val_tokens} tokens"):
        ValLoader(data, seq_len=val_tokens, batch_size=1, max_batches=1)


def test_val_split_with_fewer_windows_than_ranks_names_seq_len(data):
    manifest = load_manifest(data)
    seq_len = longest_document(manifest)
    n_windows = (manifest["splits"]["val"]["tokens"] - 1) // seq_len
    ValLoader(data, seq_len, batch_size=n_windows, max_batches=1, dp_size=n_windows)
    ranks = n_windows + 1
    with pytest.raises(DataError, match=rf"{n_windows} window\(s\) of model.seq_len={seq_len}.*{ranks} data-parallel"):
        ValLoader(data, seq_len, batch_size=ranks, max_batches=1, dp_size=ranks)


def test_seq_len_beyond_the_longest_document_names_its_length(data):
    longest = longest_document(load_manifest(data))
    TrainLoader(data, seq_len=longest, global_batch=2)
    with pytest.raises(DataError, match=rf"model.seq_len={longest + 1}.*longest document.*\({longest} tokens\)"):
        TrainLoader(data, seq_len=longest + 1, global_batch=2)


def test_global_batch_not_divisible_by_the_layout_names_the_field(data):
    with pytest.raises(ConfigError, match="train.global_batch.*grad_accum"):
        TrainLoader(data, seq_len=8, global_batch=6, grad_accum=2, dp_size=2)


def test_manifest_is_plain_json_with_the_documented_fields(data):
    manifest = json.loads((data / "manifest.json").read_text())
    assert {
        "format_version",
        "inputs",
        "vocab_size",
        "eot_id",
        "dtype",
        "tokenizer_sha256",
        "gzip9_val_bpb",
        "skipped_files",
        "splits",
    } <= manifest.keys()
    assert manifest["eot_id"] == Tokenizer.from_file(str(data / "tokenizer.json")).token_to_id(EOT)
