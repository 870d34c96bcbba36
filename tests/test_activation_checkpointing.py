"""Activation checkpointing (``train.activation_checkpointing``) changes memory, never results: with ``moe`` or
``block`` the step's losses, every gradient and the final weights equal the run without it, on one process and
under expert, FSSDP (with re-materialization), tensor and pipeline parallelism on real processes. Under FSSDP a
recomputed layer gathers no expert beyond what its plan gathers without checkpointing. Tolerances: parity.py."""

from __future__ import annotations

import pytest
from parity import assert_matches, small_config, train, train_one

from hecate.launch.simulate import run_workers

STEPS = 3
MODES = ("moe", "block")
LAYOUTS = {  # name: (world, overrides, skewed routing)
    "ep2": (2, ["parallel.ep=2", "moe.overlap_chunks=2"], False),
    "fssdp-rematerialize": (2, ["fssdp.policy=fssdp", "fssdp.rematerialize=true"], True),
    "fssdp": (2, ["fssdp.policy=fssdp"], True),
    "tp2": (2, ["parallel.tp=2"], False),
    "pp2": (2, ["parallel.pp=2"], False),
}


def _config(small_data, run_dir, overrides):
    return small_config(small_data, run_dir, overrides, STEPS).to_dict()


def test_checkpointing_matches_on_one_process(small_data, tmp_path):
    cfgs = [_config(small_data, tmp_path / m, [f"train.activation_checkpointing={m}"]) for m in ("none", *MODES)]
    want, *got = train(cfgs, distributed=False)
    for mode, result in zip(MODES, got, strict=True):
        assert_matches(result, want, f"activation_checkpointing={mode}")


def _with_and_without(cfgs: list[dict], skew: bool) -> list[dict]:
    return [train_one(cfg, True, skew) for cfg in cfgs]


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_checkpointing_matches_under_layout(name, small_data, tmp_path):
    world, overrides, skew = LAYOUTS[name]
    cfgs = [
        _config(small_data, tmp_path / mode, [*overrides, f"train.activation_checkpointing={mode}"])
        for mode in ("none", *MODES)
    ]
    want, *got = run_workers(_with_and_without, world, cfgs, skew, timeout_s=300)[0]
    for mode, result in zip(MODES, got, strict=True):
        assert_matches(result, want, f"{name}, activation_checkpointing={mode}")
        if name.startswith("fssdp"):
            assert any(want["replicas"]), "the skew should make replicas, else no gather is tested"
            gathers = {op: calls for op, calls in result["comm_calls"].items() if "gather" in op}
            assert gathers == {op: c for op, c in want["comm_calls"].items() if "gather" in op}, mode
