"""Hugging Face models in and out, on one process: a tiny random model of each family made by transformers itself
is imported and gives transformers' logits; a run started from it trains, exports with --format hf, and
transformers then gives Hecate's logits and the same greedy generation; bad folders fail naming what is wrong.

Tolerance: fp32 on both sides; the two compute the same sums in other orders (fused q/k/v, stacked experts, SDPA
against transformers' attention), measured at <= 4e-7 relative (norm of the difference over the reference's).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import FAMILIES, hf_logits, make_hf_model

from hecate.launch.cli import main
from hecate.trainer.checkpoint import model_identity
from hecate.trainer.config import load_config
from hecate.trainer.errors import HfFormatError
from hecate.trainer.export import import_weights
from hecate.trainer.hf.importer import hecate_state, open_hf
from hecate.trainer.model import Transformer

pytest.importorskip("transformers")
RTOL = 1e-4  # the bound; measured <= 4e-7
SEQ = 32


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def vocab(small_data) -> int:
    return json.loads((small_data / "manifest.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def hf_dirs(small_data, vocab, tmp_path_factory):
    return {f: make_hf_model(f, tmp_path_factory.mktemp(f), vocab, small_data / "tokenizer.json") for f in FAMILIES}


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


def imported_model(path, seq_len: int = SEQ) -> Transformer:
    hf = open_hf(path, seq_len)
    model = Transformer(hf.model, hf.moe, hf.vocab_size)
    import_weights(path, model, hf.identity())  # train.init_from's path for an HF folder
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_model_gives_transformers_logits(family, hf_dirs, vocab):
    with torch.no_grad():
        got = imported_model(hf_dirs[family])(tokens(vocab))
    assert relative_error(got, hf_logits(hf_dirs[family], tokens(vocab))) < RTOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_mapping_gives_back_every_hf_tensor(family, hf_dirs):
    """Import then export's tensor mapping, exactly: the same names, shapes and values as the folder's."""
    hf = open_hf(hf_dirs[family], SEQ)
    state = hecate_state(hf)
    back = {}
    for entry in hf.entries:
        back.update(zip(entry.hf, entry.to_hf(state[entry.hecate])))
    assert set(back) == set(hf.folder.where) - ({"lm_head.weight"} if hf.model.tie_embeddings else set())
    for name, t in back.items():
        assert torch.equal(t, hf.folder.get(name)), name


def test_import_hf_command_writes_an_export_that_loads(hf_dirs, vocab, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import-hf", str(hf_dirs["qwen2_moe"]), "--out", str(out), "--seq-len", str(SEQ)]) == 0
    assert "peak memory" in capsys.readouterr().out
    cfg = load_config(out / "model.yaml")
    model = Transformer(cfg.model, cfg.moe, vocab)
    import_weights(out, model, model_identity(cfg.model, cfg.moe, vocab))
    with torch.no_grad():
        got = model.eval()(tokens(vocab))
    assert relative_error(got, hf_logits(hf_dirs["qwen2_moe"], tokens(vocab))) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_run_from_hf_folder_trains_exports_and_transformers_agrees(family, hf_dirs, small_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from hecate.trainer.generate import generate_stream, load_trained
    from hecate.trainer.hf.importer import import_hf
    from hecate.trainer.train import Trainer

    imported = tmp_path / "imported"
    import_hf(hf_dirs[family], imported, SEQ)
    run = tmp_path / "run"
    overrides = [f"data.dir={small_data}", f"train.run_dir={run}", f"train.init_from={hf_dirs[family]}",
                 "train.steps=8", "train.global_batch=4", "train.eval_every=0", "checkpoint.every=0",
                 "optim.lr=0.001", "optim.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false",
                 "logging.plots=false"]  # fmt: skip
    trainer = Trainer(load_config(imported / "model.yaml", overrides))
    losses = [trainer.train_step(step).loss for step in range(8)]
    trainer.step = 8
    trainer.save()
    assert sum(losses[-3:]) < sum(losses[:3]), f"fine-tuning from the import did not lower the loss: {losses}"

    out = tmp_path / "hf-out"
    assert main(["export", str(run), "--out", str(out), "--format", "hf"]) == 0
    model, tokenizer, _ = load_trained(run)
    with torch.no_grad():
        want = model(tokens(model.vocab_size))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(tokens(model.vocab_size)).logits
    assert relative_error(got, want) < RTOL

    prompt = "def parse("
    ours = "".join(generate_stream(model, tokenizer, prompt, max_new_tokens=12, temperature=0.0))
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    theirs = reloaded.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == tokenizer.decode(theirs[0].tolist())


@pytest.mark.slow
def test_export_round_trip_of_the_import_gives_the_original_logits(hf_dirs, small_data, tmp_path):
    """Import, a run that saves before any step, export: transformers' logits are the original's."""
    from hecate.trainer.train import Trainer

    run = tmp_path / "run"
    overrides = [f"data.dir={small_data}", f"train.run_dir={run}", f"train.init_from={hf_dirs['qwen3_moe']}",
                 "train.steps=1", "train.global_batch=2", "train.eval_every=0", "checkpoint.every=0",
                 "logging.progress=false", "logging.tensorboard=false",
                 "logging.plots=false"]  # fmt: skip
    imported = tmp_path / "imported"
    assert main(["import-hf", str(hf_dirs["qwen3_moe"]), "--out", str(imported), "--seq-len", str(SEQ)]) == 0
    trainer = Trainer(load_config(imported / "model.yaml", overrides))
    trainer.step = 0
    trainer.save()
    out = tmp_path / "hf-out"
    assert main(["export", str(run), "--out", str(out), "--format", "hf"]) == 0
    vocab = trainer.vocab_size
    assert relative_error(hf_logits(out, tokens(vocab)), hf_logits(hf_dirs["qwen3_moe"], tokens(vocab))) < RTOL


# ---- bad folders: one error naming the file, tensor or field ------------------------------------------------


def broken_copy(hf_dirs, family, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(hf_dirs[family], folder)
    return folder


def test_missing_shard_is_named(hf_dirs, tmp_path):
    folder = broken_copy(hf_dirs, "mixtral", tmp_path)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else "model.safetensors")
                            for i, n in enumerate(names)}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HfFormatError, match="model-00001-of-00002.safetensors: missing shard"):
        open_hf(folder)


def test_wrong_tensor_shape_is_named(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = broken_copy(hf_dirs, "olmoe", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(HfFormatError, match=f"tensor '{name}' has shape \\[32, 63\\], config.json says \\[32, 64\\]"):
        open_hf(folder)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model_type", "llama", "field 'model_type' = 'llama': not a family"),
        ("hidden_act", "gelu", "field 'hidden_act' = 'gelu'"),
        ("sliding_window", 16, "field 'sliding_window' = 16"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "field 'rope_parameters.rope_type' = 'yarn'"),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(field, value, match, hf_dirs, tmp_path):
    folder = broken_copy(hf_dirs, "mixtral", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HfFormatError, match=match):
        open_hf(folder)


def test_unreadable_tokenizer_is_named_before_anything_is_written(hf_dirs, tmp_path, capsys):
    folder = broken_copy(hf_dirs, "mixtral", tmp_path)
    (folder / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    assert main(["import-hf", str(folder), "--out", str(out)]) != 0
    assert f"{folder / 'tokenizer.json'}: not a tokenizer" in capsys.readouterr().err
    assert not out.exists()


def test_identity_written_before_the_hf_options_still_matches():
    """Checkpoints and exports from before these options lack their fields: they are the defaults."""
    from hecate.parallel.config import MoEConfig
    from hecate.parallel.errors import CheckpointError
    from hecate.trainer.checkpoint import check_identity
    from hecate.trainer.config import ModelConfig

    old = model_identity(ModelConfig(), MoEConfig(shared_experts=1), 512)
    for name in ("n_kv_heads", "head_dim", "dense_activation", "attention_bias", "qk_norm", "vocab_size"):
        del old["model"][name]
    old["moe"] = {k: v for k, v in old["moe"].items() if not k.startswith("shared") and k != "first_moe_block"}
    old["moe"]["shared_expert"] = True
    check_identity(old, model_identity(ModelConfig(), MoEConfig(shared_experts=1), 512), "old")
    with pytest.raises(CheckpointError, match="moe.shared_experts: saved 1, now 0"):
        check_identity(old, model_identity(ModelConfig(), MoEConfig(), 512), "old")


def test_model_vocab_size_may_pad_but_not_cut_the_data_vocabulary():
    from hecate.collectives.errors import ConfigError
    from hecate.trainer.config import ModelConfig

    assert ModelConfig(vocab_size=520).vocab_for(512) == 520
    assert ModelConfig().vocab_for(512) == 512
    with pytest.raises(ConfigError, match="model.vocab_size"):
        ModelConfig(vocab_size=500).vocab_for(512)


@pytest.mark.parametrize(
    "model, moe, field",
    [
        ({}, {}, "moe.activation"),  # Hecate's default model: GELU experts
        ({}, {"activation": "swiglu", "score": "sigmoid"}, "moe.score"),
        ({"qk_norm": "full"}, {"activation": "swiglu", "shared_experts": 1, "shared_gate": True}, "moe.shared_experts"),
        ({"attention_bias": True}, {"activation": "swiglu"}, "model.attention_bias"),
    ],
)
def test_export_refuses_a_model_no_family_computes_naming_the_field(model, moe, field):
    from hecate.parallel.config import MoEConfig
    from hecate.trainer.config import ModelConfig
    from hecate.trainer.hf.config_map import hecate_to_hf

    with pytest.raises(HfFormatError, match=f"config field '{field}'"):
        hecate_to_hf(ModelConfig(**model), MoEConfig(**moe), 512)
