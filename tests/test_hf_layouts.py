"""The architecture options of the Hugging Face families under every layout, and an imported model's logits under
expert and tensor parallelism.

1. Two option sets (grouped-query attention, q/k/v bias, QK-norm over the whole width or per head, a head size
   other than dim / n_heads, SwiGLU dense FFN in a first dense block, two gated shared experts, top-k weights not
   renormalized, untied embeddings) train 3 steps under EP, TP, PP, ETP and FSSDP on 4 real processes and match
   the single-process reference (losses, every step's gradients, final weights; tolerances: tests/parity.py).
2. A tiny random Mixtral and OLMoE made by transformers, loaded with train.init_from under --simulate 2 with
   parallel.ep=2 and with parallel.tp=2, give transformers' logits (tests/test_hf.py's bound).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from hf_models import hf_logits, make_hf_model
from parity import assert_matches, small_config, train

from hecate.launch.simulate import run_workers
from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import config_from_dict, load_config
from hecate.trainer.plan import layout_of
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow
STEPS = 3
WORLD = 4
OPTIONS = {
    "full-qk-norm": ["model.n_kv_heads=2", "model.attention_bias=true", "model.qk_norm=full",
                     "model.dense_activation=swiglu", "model.dense_ffn_dim=32", "model.n_layers=3",
                     "moe.first_moe_block=1", "moe.activation=swiglu", "moe.shared_experts=2",
                     "moe.shared_ffn_dim=16", "moe.shared_gate=true", "moe.renormalize=false",
                     "model.tie_embeddings=false"],
    "head-qk-norm": ["model.n_kv_heads=2", "model.head_dim=32", "model.qk_norm=head", "moe.activation=swiglu",
                     "moe.renormalize=false"],
}  # fmt: skip
# The k projection's bias has a gradient of exactly zero in exact arithmetic (adding it shifts every score of a
# query alike; softmax ignores that), so its computed gradient is rounding noise (~1e-9) that differs by layout.
# AdamW's first steps scale such noise up to ~lr with the default eps 1e-8 (measured: 1.6e-4 relative in the next
# step's gradients under EP=2, 2e-7 at step 1); eps 1e-6 keeps that noise at noise level (2e-6).
ADAM_EPS = "optim.eps=1e-6"
LAYOUTS = {
    "ep2": ["parallel.ep=2"],
    "tp2-ep2": ["parallel.tp=2", "parallel.ep=2"],
    "pp2-tp2": ["parallel.pp=2", "parallel.tp=2"],
    "etp2-ep2": ["parallel.ep=2", "parallel.etp=2"],
    "fssdp4": ["fssdp.policy=fssdp"],
    "tp2-fssdp4": ["parallel.tp=2", "fssdp.policy=fssdp"],
}
RTOL_LOGITS = 1e-4  # as tests/test_hf.py
SEQ = 32


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    cfgs = [
        small_config(small_data, tmp_path_factory.mktemp(f"ref-{name}"), [*extra, ADAM_EPS], STEPS).to_dict()
        for name, extra in OPTIONS.items()
    ]
    return dict(zip(OPTIONS, train(cfgs, False)))


@pytest.fixture(scope="module")
def results(small_data, tmp_path_factory):
    """Every (options, layout) pair, one after the other in the same 4 worker processes."""
    cases = [(o, layout) for o in OPTIONS for layout in LAYOUTS]
    cfgs = [
        small_config(
            small_data, tmp_path_factory.mktemp(f"{o}-{layout}"), [*OPTIONS[o], ADAM_EPS, *LAYOUTS[layout]], STEPS
        ).to_dict()
        for o, layout in cases
    ]
    return dict(zip(cases, run_workers(train, WORLD, cfgs, True, timeout_s=600)[0]))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("options", list(OPTIONS))
def test_options_match_single_process_under_layout(options, layout, results, reference):
    assert_matches(results[(options, layout)], reference[options], f"{options} under {layout}")


def logits_under_layout(cfg_dict: dict, tokens_BS: torch.Tensor) -> torch.Tensor | None:
    """One rank: the model loaded from train.init_from, split as the layout says; its logits, gathered over the
    vocabulary under tp (every rank gets the same tokens). Rank 0 returns them."""
    cfg = config_from_dict(cfg_dict)
    parallel = Parallel.from_world(layout_of(cfg, dist.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp)
    trainer = Trainer(cfg, parallel=parallel)
    with torch.no_grad():
        logits_BSv = parallel.forward(trainer.model.eval(), tokens_BS)
    if cfg.parallel.tp > 1:
        shards = [torch.empty_like(logits_BSv) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, logits_BSv.contiguous())
        logits_BSv = torch.cat(shards, dim=-1)
    return logits_BSv if dist.get_rank() == 0 else None


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_imported_model_gives_transformers_logits_under_ep2_and_tp2(family, small_data, tmp_path):
    from hecate.trainer.hf.importer import MODEL_CONFIG_FILE, import_hf

    vocab = json.loads((small_data / "manifest.json").read_text())["vocab_size"]
    folder = make_hf_model(family, tmp_path / family, vocab, small_data / "tokenizer.json")
    import_hf(folder, tmp_path / "imported", SEQ)
    tokens_BS = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    cfgs = [
        load_config(
            tmp_path / "imported" / MODEL_CONFIG_FILE,
            [f"data.dir={small_data}", f"train.run_dir={tmp_path / name}", f"train.init_from={folder}",
             "train.global_batch=4", "logging.progress=false", "logging.tensorboard=false", layout],
        ).to_dict()
        for name, layout in (("ep2", "parallel.ep=2"), ("tp2", "parallel.tp=2"))
    ]  # fmt: skip
    want = hf_logits(folder, tokens_BS)
    for cfg in cfgs:
        got = run_workers(logits_under_layout, 2, cfg, tokens_BS, timeout_s=300)[0]
        assert ((got - want).norm() / want.norm()).item() < RTOL_LOGITS, cfg["parallel"]
