"""A run's weights -> a Hugging Face model folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
``hecate export RUN_DIR --out DIR --format hf``. Writes config.json (the family whose options match the model,
see :mod:`.config_map`), safetensors shards of at most ``shard_bytes`` with their index, and the run's tokenizer
(tokenizer.json and a tokenizer_config.json for ``AutoTokenizer``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hecate.trainer.config import load_config
from hecate.trainer.errors import HfFormatError
from hecate.trainer.hf.config_map import hecate_to_hf
from hecate.trainer.hf.families import FAMILIES
from hecate.trainer.hf.reader import CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE
from hecate.trainer.hf.tensors import tensor_map

SHARD_BYTES = 2 * 1024**3  # transformers' own save_pretrained default is larger; shards this size map easily
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def export_hf(run_dir: Path, out: Path, shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write the newest complete checkpoint of ``run_dir`` as an HF folder; returns what config.json says."""
    from hecate.trainer.generate import load_trained

    model, tokenizer, step = load_trained(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    hf_config = hecate_to_hf(cfg.model, cfg.moe, model.vocab_size)
    family = FAMILIES[hf_config["model_type"]]
    state = model.state_dict()
    for name, bias_E in state.items():
        if name.endswith("expert_bias") and bool(bias_E.any()):
            raise HfFormatError(
                f"--format hf: {name} is not zero (moe.bias_update_rate moved the expert choice): transformers' "
                f"{family.model_type} routers have no selection bias, so the exported model would route otherwise"
            )
    tensors: dict[str, torch.Tensor] = {}
    for entry in tensor_map(cfg.model, cfg.moe, family):
        tensors.update(zip(entry.hf, entry.to_hf(state[entry.hecate].detach().float())))
    if cfg.model.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(tensors, out, shard_bytes)
    hf_config["eos_token_id"] = tokenizer.token_to_id(_eos(tokenizer))
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=1))
    shutil.copyfile(run_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": _eos(tokenizer),
        "model_max_length": cfg.model.seq_len,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=1))
    return {**hf_config, "step": step, "tensors": len(tensors)}


def _eos(tokenizer) -> str | None:
    """The token that ends documents in the run's data (prepare-data's <|endoftext|>), when the tokenizer has it."""
    from hecate.trainer.data.tokenizer import EOT

    return EOT if tokenizer.token_to_id(EOT) is not None else None


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> None:
    """model-0000i-of-0000n.safetensors of at most ``shard_bytes`` each (a larger tensor alone), and the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
