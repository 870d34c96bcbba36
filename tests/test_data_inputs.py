"""prepare-data inputs beyond a folder of code: pretrained tokenizers (uint32 ids above 65,536), JSONL(.gz),
Parquet, `datasets` folders, text found by content, duplicates, several shards, several workers.

Every tokenizer and corpus is built here; nothing is downloaded.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from hecate.trainer.config import load_config
from hecate.trainer.data import EOT, TrainLoader, load_manifest, open_tokens, prepare_data, token_bytes
from hecate.trainer.data.tokenizer import load_tokenizer
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow  # starts processes

QUIET = lambda _: None  # noqa: E731
WORDS = ["alpha", "beta", "gamma", "delta", "count", "total", "value", "index", "window", "expert", "router"]


def _documents(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """n distinct prose-like documents."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, words)) + "." for i in range(n)]


def _split_texts(data: Path, split: str) -> list[str]:
    """The documents of a split, decoded from its shards."""
    manifest = load_manifest(data)
    ids = open_tokens(data, manifest, split).to_numpy().tolist()
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    eot = tokenizer.id_to_token(manifest["eot_id"])
    return tokenizer.decode(ids, skip_special_tokens=False).split(eot)[:-1]


def _byte_level_tokenizer(vocab_size: int, eot: str | None = EOT) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids whose byte tokens and merges sit at the top of the vocabulary,
    above 65,536 for a large one, so that every encoded id needs uint32. The low ids are unused fillers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("a", "l"), ("al", "p"), ("alp", "h"), ("e", "x"), ("ex", "p")]
    merged = [a + b for a, b in merges]
    n_fill = vocab_size - len(alphabet) - len(merged) - (eot is not None)
    vocab = {f"~{i}": i for i in range(n_fill)}
    for token in alphabet + merged:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if eot is not None:
        tokenizer.add_special_tokens([eot])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    return tokenizer


def _corpus(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True)
    for i, text in enumerate(texts):
        (root / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


# --- pretrained tokenizers ---


def test_150k_vocabulary_tokenizer_stores_uint32_ids_and_trains(tmp_path):
    tokenizer_json = tmp_path / "big" / "tokenizer.json"
    tokenizer_json.parent.mkdir()
    _byte_level_tokenizer(150_000).save(str(tokenizer_json))
    texts = _documents(40, words=120)
    corpus = _corpus(tmp_path / "corpus", texts)
    data = tmp_path / "data"
    manifest = prepare_data([str(corpus)], data, val_fraction=0.2, log=QUIET, tokenizer=str(tokenizer_json))
    assert manifest["dtype"] == "<u4" and manifest["vocab_size"] == 150_000 and manifest["eot_id"] == 149_999
    assert (data / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    train_N = open_tokens(data, manifest, "train").to_numpy()
    assert train_N.dtype == np.dtype("<u4") and train_N.min() > 65_535  # every id needs 32 bits
    assert sorted(_split_texts(data, "train") + _split_texts(data, "val")) == sorted(texts)
    bytes_V = token_bytes(data / "tokenizer.json")
    assert bytes_V[train_N].sum() == manifest["splits"]["train"]["bytes"]

    cfg = load_config(
        "examples/tiny.yaml",
        [
            f"data.dir={data}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=2",
            "train.eval_every=2",
            "checkpoint.every=2",
            "model.dim=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.seq_len=32",
            "moe.ffn_dim=32",
            "model.dense_ffn_dim=64",
            "train.global_batch=4",
            "train.eval_batches=1",
            "logging.progress=false",
        ],
    )
    summary = Trainer(cfg).run()
    assert np.isfinite(summary["val_bpb"]) and summary["val_bpb"] > 0


def test_hugging_face_folder_ends_documents_with_its_eos_token(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    tokenizer = _byte_level_tokenizer(600, eot="</s>")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    texts = _documents(10)
    manifest = prepare_data([str(_corpus(tmp_path / "c", texts))], tmp_path / "data", log=QUIET, tokenizer=str(folder))
    assert manifest["dtype"] == "<u2" and manifest["eot_id"] == tokenizer.token_to_id("</s>") == 599
    assert sorted(_split_texts(tmp_path / "data", "train") + _split_texts(tmp_path / "data", "val")) == sorted(texts)


def test_folder_without_tokenizer_json_is_converted_by_transformers(tmp_path):
    """A GPT-2 style folder (vocab.json + merges.txt) has no tokenizer.json; AutoTokenizer builds it."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["de"], vocab[EOT] = 256, 257
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nd e\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT}))
    texts = _documents(6)
    manifest = prepare_data([str(_corpus(tmp_path / "c", texts))], tmp_path / "data", log=QUIET, tokenizer=str(folder))
    assert manifest["eot_id"] == 257 and manifest["vocab_size"] == 258
    assert load_tokenizer(tmp_path / "data").encode("dede").ids == [256, 256]
    assert sorted(_split_texts(tmp_path / "data", "train") + _split_texts(tmp_path / "data", "val")) == sorted(texts)


def test_tokenizer_without_an_end_of_text_token_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    _byte_level_tokenizer(300, eot=None).save(str(path))
    with pytest.raises(Exception, match=r"tokenizer.json has no end-of-text token.*<\|endoftext\|>"):
        prepare_data([str(_corpus(tmp_path / "c", _documents(3)))], tmp_path / "data", log=QUIET, tokenizer=str(path))
    assert not (tmp_path / "data").exists()


# --- inputs: JSONL, Parquet, datasets, text by content ---


def test_jsonl_and_gzipped_jsonl_take_the_text_field_and_count_bad_lines(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    texts = _documents(8)
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts[:4])]
    lines += [json.dumps({"id": 99}), "not json {", json.dumps({"body": 5}), json.dumps(["body"]), ""]
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(corpus / "b.jsonl.gz", "wt", encoding="utf-8") as file:
        file.writelines(json.dumps({"body": t}) + "\n" for t in texts[4:])
    logged = []
    manifest = prepare_data(
        [str(corpus)], tmp_path / "data", vocab_size=300, val_fraction=0.25, log=logged.append, text_field="body"
    )
    assert manifest["skipped_records"] == {"c/a.jsonl": {"no string field 'body'": 3, "not JSON": 1}}
    assert "4 records skipped" in logged[0]
    assert sum(entry["documents"] for entry in manifest["splits"].values()) == 8
    assert sorted(_split_texts(tmp_path / "data", "train") + _split_texts(tmp_path / "data", "val")) == sorted(texts)


def test_parquet_row_groups_and_datasets_folders_are_read_in_order(tmp_path):
    from datasets import Dataset, DatasetDict

    texts = _documents(30)
    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"text": texts[:10], "n": list(range(10))}), corpus / "t.parquet", row_group_size=3)
    Dataset.from_dict({"text": texts[10:20]}).save_to_disk(str(tmp_path / "ds"))
    DatasetDict(
        {"a": Dataset.from_dict({"text": texts[20:25]}), "b": Dataset.from_dict({"text": texts[25:]})}
    ).save_to_disk(str(tmp_path / "dd"))
    data = tmp_path / "data"
    manifest = prepare_data(
        [str(corpus), str(tmp_path / "ds"), str(tmp_path / "dd")], data, vocab_size=300, val_fraction=0.2, log=QUIET
    )
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 30
    assert set(manifest["splits"]["train"]["files"]) == {"c/t.parquet", "ds", "dd/a", "dd/b"}
    train = _split_texts(data, "train")
    assert sorted(train + _split_texts(data, "val")) == sorted(texts)
    in_name_order = texts[:10] + texts[20:] + texts[10:20]  # c/t.parquet < dd/a < dd/b < ds
    assert train == [t for t in in_name_order if t in set(train)]


def test_text_is_recognized_by_content_not_by_name(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "LICENSE").write_text("Permission is hereby granted, free of charge, to any person.\n")
    (corpus / "notes.weird").write_text("Plain words in a file with an unusual suffix.\n")
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02binary after all")
    (corpus / "latin.txt").write_bytes(b"caf\xe9 au lait\n")
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere")
    manifest = prepare_data([str(corpus)], tmp_path / "data", vocab_size=300, val_fraction=0.5, log=QUIET)
    files = manifest["splits"]["train"]["files"] + manifest["splits"]["val"]["files"]
    assert sorted(files) == ["c/LICENSE", "c/notes.weird"]
    assert manifest["skipped_files"] == {
        "c/blob.txt": "binary",
        "c/gone.txt": "unreadable (No such file or directory)",
        "c/latin.txt": "not UTF-8",
    }


def test_exact_duplicates_are_dropped_before_the_split(tmp_path):
    texts = _documents(20)
    corpus = _corpus(tmp_path / "c", texts + texts[:5])  # files 20-24 repeat files 0-4
    with open(corpus / "more.jsonl", "w") as file:
        file.writelines(json.dumps({"text": t}) + "\n" for t in texts[5:8] + ["a new one"])
    data = tmp_path / "data"
    manifest = prepare_data([str(corpus)], data, vocab_size=300, val_fraction=0.3, log=QUIET)
    assert manifest["duplicates_dropped"] == 8
    train, val = _split_texts(data, "train"), _split_texts(data, "val")
    assert len(train) + len(val) == 21 and sorted(train + val) == sorted(texts + ["a new one"])
    assert not set(train) & set(val)
    assert "c/doc_020.txt" not in manifest["splits"]["train"]["files"] + manifest["splits"]["val"]["files"]


# --- shards and workers ---


def test_several_workers_and_several_shards_give_the_same_tokens(tmp_path):
    corpus = _corpus(tmp_path / "c", _documents(60, words=200))
    one = tmp_path / "one"
    prepare_data([str(corpus)], one, vocab_size=400, val_fraction=0.1, log=QUIET, workers=1, progress=False)
    two = tmp_path / "two"
    manifest = prepare_data(
        [str(corpus)], two, vocab_size=400, val_fraction=0.1, log=QUIET, workers=2, shard_tokens=1000, progress=False
    )
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert sorted(os.listdir(two)) == sorted(
        ["manifest.json", "tokenizer.json"]
        + [s["file"] for s in shards]
        + [s["file"] for s in manifest["splits"]["val"]["shards"]]
    )
    for split in ("train", "val"):
        reference_N = open_tokens(one, load_manifest(one), split).to_numpy()
        assert np.array_equal(open_tokens(two, manifest, split).to_numpy(), reference_N)
    assert load_manifest(one)["splits"]["train"]["sha256"] == manifest["splits"]["train"]["sha256"]
    # Windows that run across shard boundaries read the same tokens as one flat split.
    inputs_BS, targets_BS = TrainLoader(two, seq_len=64, global_batch=16, seed=5).batch(3, 0)
    reference_BS = TrainLoader(one, seq_len=64, global_batch=16, seed=5).batch(3, 0)
    assert torch.equal(inputs_BS, reference_BS[0]) and torch.equal(targets_BS, reference_BS[1])
