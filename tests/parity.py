"""Shared by the parity tests: a small config, a training function that runs on one process or as one rank of
simulated workers, and the comparison against the single-process reference."""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import RunConfig, config_from_dict, load_config
from hecate.trainer.plan import layout_of
from hecate.trainer.profile import profiled_step
from hecate.trainer.train import Trainer

# fp32 everywhere. What differs between layouts is only the order of floating-point sums (an all-reduce sums
# ranks' gradients in another order than one backward does; a matmul over fewer rows may block differently).
# Losses agree to ~1e-7 relative. Gradients and weights are compared as a whole (the norm of the difference of
# all tensors over the norm of the reference), measured at <= ~5e-6; a single tensor whose entries nearly cancel
# (an expert that lost pairs to capacity, a norm weight) was measured up to 2.5e-5, hence its looser bound.
# One mis-routed token, a missing 1/dp or a pair dropped differently from the reference is >= 1e-3.
RTOL = 1e-5
RTOL_ONE_TENSOR = 1e-4
# Over 10 steps with skewed routing, gradients drift further apart than weights or losses: plain DP=2 and EP=2
# (no FSSDP) measured up to 1.3e-5 and 3.0e-5 relative at single steps (losses still within 1e-7), and every
# FSSDP policy measured exactly the same numbers as plain EP. Long runs therefore compare gradients at 1e-4.
GRAD_RTOL_LONG = 1e-4
# Router selection offsets that make a few experts popular (the expert bias moves only the choice, so the
# model stays the same function of its weights): replicas then really exist under the FSSDP policies.
SKEW = [2.0, 1.2, 0.6, 0.0, -0.4, -0.8, -1.2, -1.6]


def small_config(data_dir, run_dir, extra: list[str], steps: int) -> RunConfig:
    return load_config(
        None,
        [
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.seq_len=32",
            "moe.num_experts=4",
            "moe.top_k=2",
            "moe.ffn_dim=64",
            "moe.aux_loss_coef=0.01",
            "moe.z_loss_coef=0.001",
            "train.global_batch=8",
            "train.grad_accum=2",
            f"train.steps={steps}",
            "train.dtype=fp32",
            "train.eval_every=0",
            "checkpoint.every=0",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.plots=false",
            "optim.warmup_steps=1",
            "optim.lr=0.003",
            *extra,
        ],
    )


def train(
    cfg_dicts: list[dict], distributed: bool, skew: bool | list[bool] = False, save: list[bool] | None = None
) -> list[dict] | None:
    """Train each config for its steps (:func:`train_one`), skewed and saved as told (one flag for all or one a
    config); rank 0 returns the records."""
    skews = skew if isinstance(skew, list) else [skew] * len(cfg_dicts)
    saves = save or [False] * len(cfg_dicts)
    results = [train_one(c, distributed, k, s) for c, k, s in zip(cfg_dicts, skews, saves, strict=True)]
    return results if not distributed or dist.get_rank() == 0 else None


def train_one(
    cfg_dict: dict, distributed: bool, skew: bool = False, save: bool = False, profile_step: int = 0, **parallel_options
) -> dict:
    """Train one config: losses, dropped pairs, replicas per step, every step's gradients and the final weights,
    whole-model (expert, tensor and pipeline shards gathered); with ``save``, a checkpoint and AdamW's first
    moments; with ``profile_step``, that step's trace. ``parallel_options`` go to ``Parallel.from_world``."""
    cfg = config_from_dict(cfg_dict)
    parallel = (
        Parallel.from_world(layout_of(cfg, dist.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp, **parallel_options)
        if distributed
        else Parallel.single()
    )
    trainer = Trainer(cfg, parallel=parallel)
    if skew:
        for layer in trainer.model.moe_layers().values():
            layer.router.expert_bias.copy_(torch.tensor(SKEW[: cfg.moe.num_experts], device=trainer.device))
    out = {"losses": [], "dropped": [], "replicas": [], "grads": []}
    for step in range(cfg.train.steps):
        if parallel.engine is not None:
            out["replicas"].append(sum(parallel.engine.replicas().values()))
        with profiled_step(trainer.model, parallel, trainer.run_dir, step + 1, profile_step):
            losses = trainer.train_step(step)
        out["losses"].append(losses.loss)
        out["dropped"].append(losses.dropped)
        out["grads"].append(
            parallel.gather_full(trainer.model, {n: p.grad for n, p in trainer.model.named_parameters()})
        )
    named = dict(trainer.model.named_parameters())
    out["comm_calls"] = {name: s.calls for name, s in parallel.stats.snapshot().items()}
    out["params"] = parallel.gather_full(trainer.model, named)
    if save:
        trainer.step = cfg.train.steps
        trainer.save()
        out["exp_avg"] = parallel.gather_full(
            trainer.model, {n: trainer.optimizer.state[p]["exp_avg"] for n, p in named.items()}
        )
    if profile_step:
        out["trace"] = json.loads((trainer.run_dir / f"profile_step{profile_step}.json").read_text())
    return out


def assert_matches(got: dict, want: dict, what: str, grad_rtol: float = RTOL) -> None:
    """Per-step losses and dropped pairs, every step's gradients and the final weights."""
    assert got["dropped"] == want["dropped"], f"{what}: dropped pairs per step differ"
    for step, (g, w) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert math.isclose(g, w, rel_tol=RTOL), f"{what}: step {step + 1} loss {g} != reference {w}"
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        _assert_close(g, w, f"{what}: step {step + 1} gradient", max(grad_rtol, RTOL_ONE_TENSOR), grad_rtol)
    _assert_close(got["params"], want["params"], f"{what}: final weights")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).norm().item() / max(want.norm().item(), 1e-30)


def _assert_close(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    what: str,
    one_tensor: float = RTOL_ONE_TENSOR,
    whole: float = RTOL,
) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        error = _relative_error(got[name], want[name])
        assert error <= one_tensor, f"{what} of {name} off by {error:.2e} (relative)"
    difference = math.sqrt(sum((got[n] - want[n]).double().square().sum().item() for n in want))
    scale = math.sqrt(sum(want[n].double().square().sum().item() for n in want))
    assert difference <= whole * scale, f"{what}s off by {difference / scale:.2e} (relative, all tensors)"
