"""Sample text from a run folder's latest checkpoint, streamed as it is made."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hecate.collectives.errors import ConfigError, HecateError
from hecate.parallel.errors import CheckpointError
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import load_config
from hecate.trainer.data import load_tokenizer
from hecate.trainer.model import Transformer, build_model

MAX_NEW_TOKENS = 10_000  # each token is one forward pass over the context: more is a runaway, not a sample
INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of a character whose last bytes are still to come


def load_trained(run_dir: Path) -> tuple[Transformer, Tokenizer, int]:
    """The model of the newest complete checkpoint of ``run_dir``, its tokenizer, and the step."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); pass the train.run_dir of a run")
    try:
        cfg = load_config(config_file)
    except ConfigError as err:
        raise CheckpointError(f"{config_file} is not a valid run config: {err}") from None
    path = ckpt.usable_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet")
    state = ckpt.read_trainer_state(path)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = build_model(cfg.model, cfg.moe, int(state["vocab_size"]), cfg.train.seed)
    ckpt.load_checkpoint(path, model, None, expect={})
    return model.eval(), tokenizer, int(state["step"])


def check_sampling(prompt: str, max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Refuse, before the model is loaded, settings that would fail half-way or quietly do nothing."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HecateError(
            f"--prompt is not valid UTF-8 text (byte {ord(prompt[err.start]) & 0xFF:#04x} at character {err.start})"
        ) from None
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise HecateError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise HecateError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise HecateError(f"--top-k must be >= 0 (0 = no top-k filtering), got {top_k}")


@torch.no_grad()
def generate_stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> Iterator[str]:
    """Autoregressive sampling with temperature and top-k, yielding the prompt and then the text of each new
    token as soon as it forms whole characters; the context is cut to the model's seq_len."""
    check_sampling(prompt, max_new_tokens, temperature, top_k)
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt).ids or [0]
    tokens_1S = torch.tensor([ids], dtype=torch.long)
    pending = ids  # tokens not yet shown: a byte-level token can end in the middle of a character
    for _ in range(max_new_tokens):
        text = tokenizer.decode(pending)
        if not text.endswith(INCOMPLETE):
            yield text
            pending = []
        logits_V = model(tokens_1S[:, -model.cfg.seq_len :])[0, -1].float()
        if temperature <= 0:
            next_id = logits_V.argmax()
        else:
            logits_V = logits_V / temperature
            if top_k > 0:
                kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            next_id = torch.multinomial(logits_V.softmax(-1), 1, generator=generator)[0]
        tokens_1S = torch.cat([tokens_1S, next_id.view(1, 1)], dim=1)
        pending = [*pending, int(next_id)]
    yield tokenizer.decode(pending)


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The whole sample of :func:`generate_stream` as one string."""
    return "".join(generate_stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed))
