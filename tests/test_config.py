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


@pytest.mark.parametrize(
    "override, field, says",
    [
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
        (["moe[0]=1"], "moe[0]=1", "dotted field name"),
        # NaN passes every comparison-based range check and inf every lower bound: each float field refuses both
        (["optim.lr=nan"], "optim.lr", "finite"),
        (["optim.grad_clip=nan"], "optim.grad_clip", "finite"),
        (["train.collective_timeout_s=inf"], "train.collective_timeout_s", "finite"),
        (["train.collective_timeout_s=1e12"], "train.collective_timeout_s", "at most"),
        (["fssdp.min_imbalance=nan"], "fssdp.min_imbalance", "finite"),
        (["moe.aux_loss_coef=inf"], "moe.aux_loss_coef", "finite"),
        (["model.norm_eps=nan"], "model.norm_eps", "finite"),
        (["train.seed=18446744073709551616"], "train.seed", "must be in [0,"),
        (["data.inputs={a: 1}"], "data.inputs", "list of single values"),
        (["model.dim=[64]"], "model.dim", "single value"),
        # the run folder is written into and --fresh deletes it: never the data, inside it or around it
        (["train.run_dir=data/stdlib"], "train.run_dir", "overlaps data.dir='data/stdlib'"),
        (["train.run_dir=data"], "train.run_dir", "overlaps data.dir"),
        (["train.run_dir=data/stdlib/run"], "train.run_dir", "overlaps data.dir"),
        (["train.run_dir=runs/x", "data.dir=runs/x/../x/data"], "train.run_dir", "overlaps data.dir"),
    ],
)
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


@pytest.mark.parametrize(
    "text, says",
    [
        ("- model\n- moe\n", "must be a mapping of sections (model, moe"),
        ("", "holds no settings"),
        ("# only a comment\n", "holds no settings"),
        ("model: [1, 2]\n", "'model': must be a mapping of model fields"),
        ("data:\n  inputs: {a: 1}\n", "'data.inputs': must be a list of single values"),
        ("42\n", "cannot be parsed"),
    ],
)
def test_config_file_of_the_wrong_shape_is_named(tmp_path, text, says):
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_folder_as_config_says_it_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


def test_only_the_demo_data_or_data_prepare_is_prepared_when_missing():
    assert load_config(EXAMPLE).data.may_prepare  # data/stdlib from the standard library: the demo
    assert not load_config(EXAMPLE, ["data.dir=data/stdlib_typo"]).data.may_prepare
    assert not load_config(EXAMPLE, ["data.inputs=[corpus]"]).data.may_prepare
    assert load_config(EXAMPLE, ["data.dir=elsewhere", "data.prepare=true"]).data.may_prepare
