"""Sample text from a run folder's latest checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer

from hecate.collectives.errors import CheckpointError
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import config_from_dict
from hecate.trainer.data import load_tokenizer
from hecate.trainer.model import Transformer, build_model


def load_trained(run_dir: Path) -> tuple[Transformer, Tokenizer, int]:
    """The model of the newest complete checkpoint of ``run_dir``, its tokenizer, and the step."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); pass the train.run_dir of a run")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    path = ckpt.usable_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet")
    state = ckpt.read_trainer_state(path)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = build_model(cfg.model, cfg.moe, int(state["vocab_size"]), cfg.train.seed)
    ckpt.load_checkpoint(path, model, None, expect={})
    return model.eval(), tokenizer, int(state["step"])


@torch.no_grad()
def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    """Autoregressive sampling with temperature and top-k; the context is cut to the model's seq_len."""
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt).ids or [0]
    tokens_1S = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        logits_V = model(tokens_1S[:, -model.cfg.seq_len:])[0, -1].float()
        if temperature <= 0:
            next_id = logits_V.argmax()
        else:
            logits_V = logits_V / temperature
            if top_k > 0:
                kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            next_id = torch.multinomial(logits_V.softmax(-1), 1, generator=generator)[0]
        tokens_1S = torch.cat([tokens_1S, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(tokens_1S[0].tolist())
