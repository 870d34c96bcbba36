"""A run's weights outside the trainer: ``hecate export RUN_DIR --out DIR`` and ``hecate train ... --init-from DIR``.

The export is one safetensors file with the model's own parameter names (``blocks.1.ffn.experts.w1`` holds every
expert of that layer, [E, ...] in expert order, whatever layout trained it), a ``config.json`` naming the model
it fits (the same identity a checkpoint carries) and the run's tokenizer. Safetensors holds tensors only, so
importing one unpickles nothing. ``--format hf`` writes a Hugging Face folder instead (:mod:`hecate.trainer.hf`),
and ``--init-from`` also takes one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from hecate.parallel.errors import CheckpointError
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.generate import load_trained

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
IDENTITY_KEYS = ("model", "moe", "vocab_size")


def export_run(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the newest complete checkpoint of ``run_dir`` to ``out``; returns what config.json says."""
    model, _, step = load_trained(run_dir)
    state = ckpt.read_trainer_state(run_dir / "checkpoints" / f"{ckpt.PREFIX}{step:08d}")  # the one loaded
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE), metadata={"format": "pt", "step": str(step)})
    config = {
        **{k: state[k] for k in IDENTITY_KEYS},
        "step": step,
        "source": str(run_dir.resolve()),
        "parameters": {name: list(t.shape) for name, t in model.state_dict().items()},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if (run_dir / TOKENIZER_FILE).is_file():
        shutil.copyfile(run_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return config


def read_export_config(path: Path) -> dict[str, Any]:
    """The config.json of an export folder; a folder that is not one is refused naming what is missing."""
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"--init-from {path}: not an exported model (no {' or '.join(missing)}; "
            f"write one with `hecate export RUN_DIR --out {path}`)"
        )
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except ValueError as err:
        raise CheckpointError(f"--init-from {path}: unreadable {CONFIG_FILE}: {err}") from None


def check_export_fits(path: Path, expect: dict[str, Any]) -> None:
    """Refuse an export written for another model than ``expect`` (:func:`checkpoint.model_identity`), naming
    every field that differs; the CLI calls it before any worker starts, the trainer again before loading. A
    Hugging Face model folder is checked by :mod:`hecate.trainer.hf`."""
    from hecate.trainer.hf.importer import check_hf_fits, is_hf_folder

    if is_hf_folder(path):
        return check_hf_fits(path, expect)
    ckpt.check_identity(read_export_config(path), expect, f"exported model {path}")


def import_weights(path: Path, model: nn.Module, expect: dict[str, Any]) -> None:
    """Load an export (or a Hugging Face model folder) into a freshly built model that holds every expert (before
    the layout splits it)."""
    from hecate.trainer.hf.importer import is_hf_folder, load_hf_into

    if is_hf_folder(path):
        return load_hf_into(path, model, expect)
    check_export_fits(path, expect)
    try:
        load_model(model, str(path / WEIGHTS_FILE), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"--init-from {path}: cannot load {WEIGHTS_FILE}: {str(err).splitlines()[0]}") from None
