"""Config loading: YAML + overrides into typed dataclasses; bad input named by field before anything runs."""
import pytest

from hecate.collectives.errors import ConfigError
from hecate.trainer.config import RunConfig, config_from_dict, load_config

EXAMPLE = "examples/tiny.yaml"


def test_example_config_loads_with_types():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, RunConfig)
    assert cfg.moe.num_experts == 8 and cfg.data.inputs == ["stdlib"]


def test_override_wins_over_file():
    cfg = load_config(EXAMPLE, ["moe.num_experts=16", "train.dtype=bf16", "data.inputs=[a,b]"])
    assert (cfg.moe.num_experts, cfg.train.dtype, cfg.data.inputs) == (16, "bf16", ["a", "b"])


def test_round_trip_through_dict():
    cfg = load_config(EXAMPLE, ["moe.top_k=1"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, field, says", [
    (["moe.num_expert=3"], "moe.num_expert", "allowed here: num_experts"),
    (["trian.steps=3"], "trian", "allowed here: model, moe"),
    (["moe.num_experts=abc"], "moe.num_experts", "could not be converted"),
    (["train.steps=1.5"], "train.steps", "could not be converted"),
    (["moe.top_k=9"], "moe.top_k", "[1, num_experts=8]"),
    (["moe.activation=relu"], "moe.activation", "gelu"),
    (["moe.capacity_factor=-1"], "moe.capacity_factor", ">= 0"),
    (["model.n_heads=3"], "model.n_heads", "must divide model.dim=256"),
    (["train.dtype=fp16"], "train.dtype", "fp32"),
    (["train.grad_accum=3"], "train.grad_accum", "must divide train.global_batch=16"),
    (["optim.no_decay=[weights]"], "optim.no_decay", "norm"),
    (["parallel.dp=0"], "parallel.dp", "-1"),
    (["moe.num_experts"], "moe.num_experts", "key=value"),
])
def test_bad_values_name_the_field(override, field, says):
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, override)
    assert info.value.field.startswith(field)
    assert says in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  dimm: 64\n")
    with pytest.raises(ConfigError, match="model.dimm"):
        load_config(typo)
