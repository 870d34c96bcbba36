"""The layout: degrees validated against the world and the model, the rank groups of both mesh views, and
``hecate plan``. Pure functions, no processes."""

from __future__ import annotations

import pytest

from hecate.launch.cli import main
from hecate.parallel.config import ParallelConfig
from hecate.parallel.errors import LayoutError
from hecate.parallel.topology import ParallelDims
from hecate.trainer.config import load_config
from hecate.trainer.plan import layout_of, memory_per_rank


def dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**degrees), world, num_experts=8, n_layers=4, n_heads=4)


def test_dp4_folded_as_edp2_ep2_groups():
    layout = dims(4, ep=2)
    assert (layout.dp, layout.ep, layout.edp) == (4, 2, 2)
    assert layout.groups("dp") == [[0, 1, 2, 3]]
    assert layout.groups("ep") == [[0, 1], [2, 3]]
    assert layout.groups("edp") == [[0, 2], [1, 3]]
    assert layout.coordinates(3) == {"pp": 0, "dp": 3, "tp": 0, "edp": 1, "ep": 1, "etp": 0}


def test_every_rank_is_in_exactly_one_group_of_each_dimension():
    layout = dims(8, tp=2, ep=2)
    for dim in ("pp", "dp", "tp", "edp", "ep", "etp"):
        ranks = sorted(r for group in layout.groups(dim) for r in group)
        assert ranks == list(range(8)), dim


@pytest.mark.parametrize(
    "world, degrees, says",
    [
        (6, {"ep": 3}, "moe.num_experts=8 must be divisible by parallel.ep=3"),
        (4, {"dp": 3}, "parallel.dp=3"),
        (4, {"pp": 3}, "parallel.pp=3"),
        (2, {"ep": 4}, "parallel.ep=4 x parallel.etp=1 must divide"),
        (8, {"tp": 8}, "parallel.tp=8 must divide model.n_heads=4"),
        (8, {"pp": 8}, "parallel.pp=8 is larger than model.n_layers=4"),
    ],
)
def test_layouts_that_do_not_fit_name_the_fields(world, degrees, says):
    with pytest.raises(LayoutError, match=says.replace(".", r"\.")):
        dims(world, **degrees)


def test_plan_checks_the_batch_split_and_shows_groups_and_memory(capsys):
    cfg = load_config("examples/tiny.yaml", ["parallel.ep=2"])
    with pytest.raises(LayoutError, match="train.global_batch=6"):
        layout_of(load_config("examples/tiny.yaml", ["train.global_batch=6"]), 4)
    assert main(["plan", "examples/tiny.yaml", "--world", "4", "-o", "parallel.ep=2", "--vocab-size", "8192"]) == 0
    out = capsys.readouterr().out
    assert "ep groups: [[0, 1], [2, 3]]" in out and "edp groups: [[0, 2], [1, 3]]" in out
    assert "experts per rank per MoE layer: 4 (of 8)" in out and "memory per rank" in out
    ep1 = memory_per_rank(cfg, layout_of(load_config("examples/tiny.yaml"), 4), 8192)
    ep2 = memory_per_rank(cfg, layout_of(cfg, 4), 8192)
    assert ep2["parameters"] < ep1["parameters"]  # the experts are split over two ranks


def test_plan_shows_explicit_pipeline_stages(capsys):
    """parallel.pp_stage_blocks replaces the cost-balanced split (tests/test_tp_pp_parity.py trains with it)."""
    pipeline = ["-o", "parallel.pp=2", "-o", "train.grad_accum=2", "--vocab-size", "8192"]
    assert main(["plan", "examples/tiny.yaml", "--world", "2", *pipeline]) == 0
    assert "stage 1 on pp rank 1: blocks [3] + head" in capsys.readouterr().out  # balanced: the head weighs
    assert main(["plan", "examples/tiny.yaml", "--world", "2", *pipeline, "-o", "parallel.pp_stage_blocks=[1,3]"]) == 0
    explicit = capsys.readouterr().out
    assert "stage 0 on pp rank 0: blocks [0] + embedding" in explicit
    assert "stage 1 on pp rank 1: blocks [1, 2, 3] + head" in explicit
