"""Tensor, pipeline and expert-tensor parallelism, folded with expert parallelism and FSSDP, reproduce the
single-process reference: per-step losses, every step's gradients (gathered from every shard and stage) and the
final weights, 5 steps in fp32 on 4 real processes (gloo). All layouts share one group of worker processes.
Tolerances: tests/parity.py.
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_matches, small_config, train

from hecate.launch.simulate import run_workers
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow  # starts processes

STEPS = 5
WORLD = 4
DEEP = ["model.n_layers=4"]  # 4 stages for interleaved 1F1B
LAYOUTS = {  # name: (overrides, reference, skewed routing)
    "tp2-ep2": (["parallel.tp=2", "parallel.ep=2"], "base", False),
    "pp2-ep2": (["parallel.pp=2", "parallel.ep=2"], "base", False),
    "pp2-tp2": (["parallel.pp=2", "parallel.tp=2"], "base", False),
    "pp2-interleaved": (["parallel.pp=2", "parallel.pp_virtual=2", *DEEP], "deep", False),
    "pp2-stages-3-1": (["parallel.pp=2", "parallel.ep=2", "parallel.pp_stage_blocks=[3,1]", *DEEP], "deep", False),
    "tp2-folded-ep4": (["parallel.tp=2", "parallel.ep=4"], "base", False),
    "pp2-fssdp2-skewed": (["parallel.pp=2", "fssdp.policy=fssdp"], "base", True),
    "tp2-fssdp4-skewed": (["parallel.tp=2", "fssdp.policy=fssdp"], "base", True),
    "etp2-ep2": (["parallel.ep=2", "parallel.etp=2"], "base", False),
    # overlap chunks are cut where each rank's rows fall, so the etp peers' cuts differ
    "etp2-ep2-chunks3-skewed": (["parallel.ep=2", "parallel.etp=2", "moe.overlap_chunks=3"], "base", True),
}
REFERENCES = {"base": [], "deep": DEEP}


SAVED = ("pp2-tp2", "etp2-ep2")  # these also write a checkpoint, which one process then resumes


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """Single-process results: the 2-block model, the 4-block model, and the 2-block one with skewed routing."""
    names = [("base", False), ("deep", False), ("base", True)]
    cfgs = [
        small_config(small_data, tmp_path_factory.mktemp(f"ref-{n}-{s}"), REFERENCES[n], STEPS).to_dict()
        for n, s in names
    ]
    return dict(zip(names, train(cfgs, False, [s for _, s in names])))


@pytest.fixture(scope="module")
def results(small_data, tmp_path_factory):
    """Every layout, one after the other in the same 4 worker processes."""
    cfgs = [
        small_config(small_data, tmp_path_factory.mktemp(name), overrides, STEPS).to_dict()
        for name, (overrides, _, _) in LAYOUTS.items()
    ]
    skews = [skew for _, _, skew in LAYOUTS.values()]
    saves = [name in SAVED for name in LAYOUTS]
    results = run_workers(train, WORLD, cfgs, True, skews, saves, timeout_s=600)[0]
    for cfg, got in zip(cfgs, results):
        got["run_dir"] = cfg["train"]["run_dir"]
    return dict(zip(LAYOUTS, results))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, results, reference):
    _, ref, skew = LAYOUTS[name]
    assert_matches(results[name], reference[(ref, skew)], name)


@pytest.mark.parametrize("name", ["pp2-fssdp2-skewed", "tp2-fssdp4-skewed"])
def test_skewed_fssdp_materializes_replicas(name, results):
    """Without replicas the FSSDP cases would test plain expert parallelism only."""
    assert sum(results[name]["replicas"]) > 0


@pytest.mark.parametrize("name", SAVED)
def test_checkpoint_resumes_on_one_process(name, results, small_data):
    """Tensor-, pipeline- and expert-tensor-split weights and moments are saved whole and load into one process."""
    got = results[name]
    cfg = small_config(small_data, got["run_dir"], [], STEPS)
    trainer = Trainer(cfg, resume=True)
    assert trainer.step == STEPS
    named = dict(trainer.model.named_parameters())
    assert named.keys() == got["params"].keys()
    for n, p in named.items():
        assert torch.equal(p.detach(), got["params"][n]), f"{name}: weight {n}"
        assert torch.equal(trainer.optimizer.state[p]["exp_avg"], got["exp_avg"][n]), f"{name}: moment {n}"
