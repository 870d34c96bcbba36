"""A Hugging Face model folder -> Hecate's weights: ``hecate import-hf HF_DIR --out DIR`` writes the project's
export format (``hecate train ... --init-from DIR``), and ``train.init_from`` also takes the HF folder itself.

Every HF tensor's shape is checked against the config before any is read, so a wrong shape or a missing shard
fails at once, naming the file and tensor. Tensors are then read one at a time, each converted as soon as it is
read; a reader that holds only some experts reads only their rows (``experts``).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from hecate.parallel.config import MoEConfig
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import ModelConfig
from hecate.trainer.errors import HfFormatError
from hecate.trainer.hf.config_map import hf_to_hecate
from hecate.trainer.hf.families import Family
from hecate.trainer.hf.reader import CONFIG_FILE, HfFolder
from hecate.trainer.hf.tensors import Entry, tensor_map
from hecate.trainer.model import Transformer

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model.yaml"  # the model and moe sections of a run config that fits the import


@dataclass
class HfModel:
    """An opened, checked HF folder and the Hecate model it is."""

    folder: HfFolder
    model: ModelConfig
    moe: MoEConfig
    vocab_size: int
    family: Family
    entries: list[Entry]

    def identity(self) -> dict[str, Any]:
        return ckpt.model_identity(self.model, self.moe, self.vocab_size)


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json names a transformers model type (an export of Hecate's own names none)."""
    try:
        return "model_type" in json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


def open_hf(path: Path, seq_len: int | None = None) -> HfModel:
    """Read config.json, map it, and check every tensor's presence and shape (no tensor data is read)."""
    folder = HfFolder(Path(path))
    model, moe, vocab_size, family = hf_to_hecate(folder.config, str(folder.path / CONFIG_FILE), seq_len)
    first_moe = next((i for i in range(model.n_layers) if moe.is_moe_block(i)), 0)
    fused = folder.has(f"model.layers.{first_moe}.{family.moe_block}.experts.gate_up_proj")
    hf = HfModel(folder, model, moe, vocab_size, family, tensor_map(model, moe, family, fused))
    _check_shapes(hf)
    return hf


def hecate_tensors(hf: HfModel, experts: range | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Hecate's parameters (fp32) one at a time, by name, each read when asked for; every expert tensor holds only
    the rows of ``experts`` when given (read without the others)."""
    for entry in hf.entries:
        if entry.experts == "per_expert" and experts is not None:
            tensors = [hf.folder.get(name) for name in entry.hf[experts.start : experts.stop]]
        elif entry.experts == "fused" and experts is not None:
            tensors = [hf.folder.rows(entry.hf[0], experts.start, experts.stop)]
        else:
            tensors = [hf.folder.get(name) for name in entry.hf]
        yield entry.hecate, entry.to_hecate(tensors)


def hecate_state(hf: HfModel, experts: range | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of :func:`hecate_tensors` at once."""
    return dict(hecate_tensors(hf, experts))


def load_hf_into(path: Path, model: nn.Module, expect: dict[str, Any]) -> None:
    """``train.init_from`` = an HF folder: load it into a freshly built model that holds every expert, one tensor at
    a time (the model and one converted tensor in memory, never a second copy of the model)."""
    hf = open_hf(path, seq_len=expect["model"]["seq_len"])
    ckpt.check_identity(hf.identity(), expect, f"Hugging Face model {path}")
    targets = model.state_dict()
    tied = {"lm_head.weight"} if hf.model.tie_embeddings else set()  # the embedding's weight, loaded under its name
    wanted = {name for name in targets if not name.endswith("expert_bias") and name not in tied}  # biases start at 0
    given = {entry.hecate for entry in hf.entries}
    if wanted != given:
        raise HfFormatError(
            f"{path}: does not fill the model: missing {sorted(wanted - given)}, unexpected {sorted(given - wanted)}"
        )
    with torch.no_grad():
        for name, tensor in hecate_tensors(hf):
            targets[name].copy_(tensor)
    log.info("loaded %s (%s); peak memory of this rank %.0f MiB", path, hf.family.model_type, peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_hf_fits(path: Path, expect: dict[str, Any]) -> None:
    """Refuse, before any worker starts, an HF folder that is not this config's model (naming what differs)."""
    hf = open_hf(path, seq_len=expect["model"]["seq_len"])
    ckpt.check_identity(hf.identity(), expect, f"Hugging Face model {path}")


def import_hf(path: Path, out: Path, seq_len: int | None = None) -> dict[str, Any]:
    """Write ``out`` in Hecate's export format (model.safetensors, config.json, tokenizer.json) plus
    ``model.yaml``, the model and moe sections of a run config that fits it. Returns config.json's content
    with the peak resident memory of this process."""
    from hecate.trainer.export import CONFIG_FILE as EXPORT_CONFIG
    from hecate.trainer.export import TOKENIZER_FILE, WEIGHTS_FILE

    hf = open_hf(path, seq_len)
    tokenizer = hf.folder.tokenizer_file()
    state = hecate_state(hf)
    for name in _meta_model(hf).state_dict():
        if name.endswith("expert_bias"):
            state[name] = torch.zeros(hf.moe.num_experts)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "source": str(Path(path).resolve())})
    config = {
        **hf.identity(),
        "step": 0,
        "source": str(Path(path).resolve()),
        "hf_family": hf.family.model_type,
        "parameters": {name: list(t.shape) for name, t in state.items()},
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=1))
    shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    sections = {"model": asdict(hf.model), "moe": asdict(hf.moe)}
    (out / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(sections, sort_keys=False))
    return {**config, "peak_rss_mib": peak_rss_mib()}


def _meta_model(hf: HfModel) -> Transformer:
    """The Hecate model of this folder without memory: its parameters' names and shapes."""
    with torch.device("meta"):
        return Transformer(hf.model, hf.moe, hf.vocab_size)


def _check_shapes(hf: HfModel) -> None:
    """Each HF tensor's shape against what the config says, naming the file and tensor."""
    shapes = {name: t.shape for name, t in _meta_model(hf).state_dict().items()}
    for entry in hf.entries:
        if entry.experts == "fused":
            continue  # checked below against the stacked shape
        wanted = [list(t.shape) for t in entry.to_hf(torch.empty(shapes[entry.hecate], device="meta"))]
        for name, want in zip(entry.hf, wanted):
            got = hf.folder.shape(name)
            if got != want:
                raise HfFormatError(
                    f"{hf.folder.path / hf.folder.where[name]}: tensor {name!r} has shape {got}, "
                    f"config.json says {want}"
                )
    for entry in (e for e in hf.entries if e.experts == "fused"):
        got = hf.folder.shape(entry.hf[0])
        E, D, F = shapes[entry.hecate]
        want = [E, F, D] if entry.hf[0].endswith("down_proj") else [E, 2 * F, D]
        if got != want:
            raise HfFormatError(f"{hf.folder.path}: tensor {entry.hf[0]!r} has shape {got}, config.json says {want}")
