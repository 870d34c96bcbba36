"""What keeps the GPU path honest on a machine without a GPU.

The training step (forward, backward, gradient averaging, clipping, the optimizer step, router-bias updates and
evaluation) runs under expert, FSSDP, tensor and pipeline parallelism in real worker processes whose default
device is ``meta``: any tensor the step creates without an explicit device is then a meta tensor, and mixing it
with the run's CPU tensors (or reading it) raises - the same tensor would land on the CPU while the run is on a
GPU. The results must still equal the single-process reference. The device choices and their refusals (a GPU
asked for where there is none; more simulated ranks than one GPU's memory holds) are checked here too.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_VOCAB
from parity import RTOL, SKEW, assert_matches, small_config, train_one

from hecate.collectives import CommStats, TorchTransport
from hecate.collectives.errors import ConfigError
from hecate.collectives.host_staged import HOST_STAGED, STAGE_ALL_ENV
from hecate.collectives.streams import CommStream
from hecate.launch.simulate import run_workers, start_workers
from hecate.parallel.errors import LayoutError
from hecate.parallel.moe.experts import ExpertWeights, expert_gemm_for
from hecate.parallel.parallelize import Parallel
from hecate.trainer.config import config_from_dict
from hecate.trainer.device import check_device, select_device
from hecate.trainer.flops import peak_flops, step_flops
from hecate.trainer.metrics import read_metrics
from hecate.trainer.plan import check_ranks_fit_gpu, describe_plan, layout_of
from hecate.trainer.train import Trainer

HECATE = str(Path(sys.executable).parent / "hecate")
STEPS = 2
LAYOUTS = {  # name: (world, overrides, skewed routing)
    "ep2-overlap": (2, ["parallel.ep=2", "moe.overlap_chunks=2"], False),
    "fssdp-skewed-rematerialize": (2, ["fssdp.policy=fssdp", "fssdp.rematerialize=true"], True),
    "tp2": (2, ["parallel.tp=2"], False),
    "pp2": (2, ["parallel.pp=2"], False),
    "dp2-bf16": (2, ["train.dtype=bf16"], False),
    "etp2-capacity-shared-expert": (
        2,
        ["parallel.etp=2", "moe.capacity_factor=1.0", "moe.shared_experts=1"],
        False,
    ),
    "dp2-sub-batches": (2, ["moe.overlap_sub_batches=2"], False),
}
BF16_RTOL = 2e-2  # bf16 autocast: layouts sum in other orders, and bf16 keeps 8 bits of mantissa


def steps_and_eval(cfg_dict: dict, distributed: bool, skew: bool, default_device: str | None) -> dict:
    """Train ``train.steps`` steps and evaluate, with ``default_device`` as torch's default device."""
    if default_device is not None:
        torch.set_default_device(default_device)
    cfg = config_from_dict(cfg_dict)
    parallel = (
        Parallel.from_world(layout_of(cfg, torch.distributed.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp)
        if distributed
        else None
    )
    trainer = Trainer(cfg, parallel=parallel)
    if skew:
        for layer in trainer.model.moe_layers().values():
            layer.router.expert_bias.copy_(torch.tensor(SKEW[: cfg.moe.num_experts], device=trainer.device))
    losses = [trainer.train_step(step).loss for step in range(cfg.train.steps)]
    return {"losses": losses, "val_loss": trainer.evaluate()["val_loss"]}


def _config(small_data, run_dir, overrides):
    return small_config(small_data, run_dir, overrides, STEPS).to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_training_step_creates_no_tensor_without_device(name, small_data, tmp_path):
    world, overrides, skew = LAYOUTS[name]
    model = [o for o in overrides if o.startswith(("train.dtype", "moe."))]  # the reference's model and precision
    dtype = [o for o in model if o.startswith("train.dtype")]
    want = steps_and_eval(_config(small_data, tmp_path / "ref", model), False, skew, None)
    got = run_workers(
        steps_and_eval, world, _config(small_data, tmp_path / "meta", overrides), True, skew, "meta", timeout_s=300
    )[0]
    rtol = BF16_RTOL if dtype else RTOL
    for step, (g, w) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert math.isclose(g, w, rel_tol=rtol), f"{name}: step {step + 1} loss {g} != reference {w}"
    assert math.isclose(got["val_loss"], want["val_loss"], rel_tol=rtol), name


def test_single_process_step_creates_no_tensor_without_device(small_data, tmp_path):
    """The single-process step (the reference of every layout) under the same check, in this process."""
    cfg = _config(small_data, tmp_path / "ref", [])
    want = steps_and_eval(cfg, False, False, None)
    try:
        got = steps_and_eval(_config(small_data, tmp_path / "meta", []), False, False, "meta")
    finally:
        torch.set_default_device(None)
    assert got == want


def test_the_meta_check_catches_a_tensor_created_without_device():
    """A tensor made without ``device=`` under the check meets the run's CPU tensors and fails, as it would have
    met CUDA tensors on a GPU."""
    weights = torch.ones(3, device="cpu")
    try:
        torch.set_default_device("meta")
        with pytest.raises((RuntimeError, NotImplementedError)):
            (weights + torch.zeros(3)).tolist()
    finally:
        torch.set_default_device(None)


def test_cpu_is_chosen_without_a_gpu():
    assert not torch.cuda.is_available(), "this test describes a machine without a GPU"
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu", local_rank=3, local_world_size=4) == torch.device("cpu")


def test_cuda_without_a_gpu_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"train\.device.*is cuda but"):
        check_device("cuda")


def test_cli_refuses_cuda_without_a_gpu_before_any_start(tmp_path):
    run_dir = tmp_path / "run"
    for launch in ([], ["--simulate", "2"]):
        result = subprocess.run(
            [HECATE, "train", "examples/tiny.yaml", "-o", "train.device=cuda", "-o", f"train.run_dir={run_dir}"]
            + launch,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "train.device" in lines[0] and "Traceback" not in result.stderr, result.stderr
        assert not run_dir.exists()


def test_simulated_ranks_that_overflow_one_gpu_are_refused(small_data, tmp_path):
    cfg = config_from_dict(_config(small_data, tmp_path, ["parallel.ep=2"]))
    dims = layout_of(cfg, 4)
    check_ranks_fit_gpu(cfg, dims, 512, ranks=4, gpu_bytes=80 * 2**30)  # a small model fits in an 80 GiB GPU
    with pytest.raises(LayoutError, match=r"--simulate 4 .*4 ranks share one GPU"):
        check_ranks_fit_gpu(cfg, dims, 512, ranks=4, gpu_bytes=2**20)


def test_plan_shows_the_device_of_each_rank(small_data, tmp_path):
    cfg = config_from_dict(_config(small_data, tmp_path, ["parallel.ep=2", "train.device=cuda"]))
    plan = describe_plan(cfg, 2, 512)
    assert "rank r on cuda:LOCAL_RANK" in plan and "memory per GPU" in plan
    cfg = config_from_dict(_config(small_data, tmp_path, ["train.device=cpu"]))
    assert "every rank on the CPU" in describe_plan(cfg, 2, 512)


# fp32: the three ways sum the same products in other orders (a GEMM blocks its inner dimension differently)
GEMM_RTOL = 1e-5
BF16_GEMM_RTOL = 2e-2  # bf16 operands (8-bit mantissa), fp32 accumulation in each way


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("gemm", ["grouped", "padded"])
def test_expert_gemms_match_the_loop(gemm, activation):
    """Forward and every gradient equal the per-expert loop's, with an expert without rows and a call that
    computes only some experts (as overlap chunks do)."""
    torch.manual_seed(0)
    experts, dim, hidden = 4, 16, 32
    counts, first = [5, 0, 7], 1
    w1 = torch.randn(experts, dim, hidden, requires_grad=True)
    w2 = torch.randn(experts, hidden, dim, requires_grad=True)
    w3 = torch.randn(experts, dim, hidden, requires_grad=True) if activation == "swiglu" else None
    x = torch.randn(sum(counts), dim, requires_grad=True)
    grad_out = torch.randn(sum(counts), dim)
    results = {}
    for way in ("loop", gemm):
        y = ExpertWeights(w1, w2, w3, activation, gemm=way)(x, counts, first)
        params = [t for t in (x, w1, w2, w3) if t is not None]
        results[way] = (y.detach(), *torch.autograd.grad(y, params, grad_out))
    for want, got in zip(results["loop"], results[gemm], strict=True):
        torch.testing.assert_close(got, want, rtol=GEMM_RTOL, atol=GEMM_RTOL * want.abs().max().item())
    assert results[gemm][2][0].abs().max() == 0  # expert 0 has no call here: no gradient


def test_grouped_gemm_under_bf16_autocast_matches_the_loop():
    torch.manual_seed(0)
    w1, w2, w3 = torch.randn(3, 16, 32), torch.randn(3, 32, 16), torch.randn(3, 16, 32)
    x, counts = torch.randn(12, 16), [4, 0, 8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ExpertWeights(w1, w2, w3, "swiglu", gemm="loop")(x, counts)
        got = ExpertWeights(w1, w2, w3, "swiglu", gemm="grouped")(x, counts)
    assert got.dtype == want.dtype == torch.bfloat16
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_GEMM_RTOL, atol=BF16_GEMM_RTOL * scale)


def test_the_cpu_keeps_the_per_expert_loop():
    assert expert_gemm_for(torch.device("cpu")) == "loop"
    assert ExpertWeights(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8), None, "gelu").gemm == "loop"


def test_metrics_and_summary_carry_flops_and_mfu(small_data, tmp_path):
    cfg = config_from_dict(_config(small_data, tmp_path / "run", ["moe.capacity_factor=1.0", "train.peak_tflops=0.5"]))
    trainer = Trainer(cfg)
    summary = trainer.run()
    records = [r for r in read_metrics(trainer.run_dir) if "loss" in r]
    tokens = cfg.train.global_batch * cfg.model.seq_len
    for record in records:
        rows = sum(sum(c) for c in record["expert_load"].values()) - record["dropped_pairs"]
        assert record["dropped_pairs"] > 0 and rows < tokens * cfg.moe.top_k * cfg.model.n_layers
        assert math.isclose(record["model_flops_per_token"], step_flops(cfg, SMALL_VOCAB, tokens, rows) / tokens)
        assert math.isclose(
            record["flops_per_s_per_device"] * record["step_time_s"], record["model_flops_per_token"] * tokens
        )
        assert math.isclose(record["mfu"], record["flops_per_s_per_device"] / 0.5e12)
    assert summary["peak_source"] == "train.peak_tflops" and summary["device"] == "cpu"
    assert summary["mfu"] == records[-1]["mfu"]  # two steps: the first is warm-up


def test_cpu_peak_is_measured():
    peak, source = peak_flops(torch.device("cpu"), "fp32")
    assert 1e8 < peak < 1e13 and source.startswith("measured CPU matmul")


def exchange_temporaries() -> list[list[float]]:
    """Issue exchanges of buffers nobody else holds, then wait: the handles keep them alive until then."""
    import torch.distributed as dist

    transport = TorchTransport(None, CommStats())
    rank, world = dist.get_rank(), dist.get_world_size()
    splits = [1] * world
    handles = [
        transport.all_to_all(torch.empty(world, device="cpu"), torch.full((world,), 10.0 * i + rank), splits, splits)
        for i in range(3)
    ]
    handles.append(transport.all_reduce(torch.ones(2, device="cpu"), name="ones"))
    return [handle.wait().tolist() for handle in handles]


@pytest.mark.slow
def test_exchanges_run_through_the_communication_stream_on_cpu():
    """The stream code every transport operation goes through (a side stream and events on an accelerator)
    runs here through the same calls; results and buffer lifetimes as without it."""
    assert CommStream(torch.device("cpu")).side is None
    got = run_workers(exchange_temporaries, 2, timeout_s=120)
    assert got[0] == [[0.0, 1.0], [10.0, 11.0], [20.0, 21.0], [2.0, 2.0]]
    assert got[1] == got[0]


STAGED_LAYOUTS = {  # name: (overrides, skewed routing)
    "ep2": (["parallel.ep=2"], False),
    "fssdp-skewed": (["fssdp.policy=fssdp"], True),
    "tp2": (["parallel.tp=2"], False),
    "pp2": (["parallel.pp=2"], False),
}


def train_host_staged(cfg_dict: dict, skew: bool) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    assert dist.get_backend() == HOST_STAGED and group.stage_all, "the run must go through the host-staged group"
    return train_one(cfg_dict, True, skew)


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGED_LAYOUTS)
def test_host_staged_exchanges_match_single_process(name, small_data, tmp_path):
    """The single-GPU simulated mode's exchange path (every operation through host copies over gloo), here with
    host tensors copied as device tensors would be: the same losses, gradients and weights as one process."""
    overrides, skew = STAGED_LAYOUTS[name]
    want = train_one(small_config(small_data, tmp_path / "ref", [], STEPS).to_dict(), False, skew)
    cfg = small_config(small_data, tmp_path / "staged", overrides, STEPS).to_dict()
    group = start_workers(train_host_staged, 2, (cfg, skew), backend=HOST_STAGED, env={STAGE_ALL_ENV: "1"})
    assert_matches(group.join(timeout_s=300)[0], want, name)


BF16_REDUCE_RTOL = 1e-2  # each rank's gradient rounded once to bf16 (8-bit mantissa) before the sum


@pytest.mark.slow
def test_bf16_gradient_reduction_rounds_only_the_exchange(small_data, tmp_path):
    """train.grad_reduce_dtype=bf16: the all-reduce carries bf16 (the gradients differ from the fp32 reduction's,
    by about bf16's rounding), and training follows the reference within that."""
    want = train_one(small_config(small_data, tmp_path / "ref", [], STEPS).to_dict(), False)
    cfg = small_config(small_data, tmp_path / "bf16", ["train.grad_reduce_dtype=bf16"], STEPS).to_dict()
    got = run_workers(train_one, 2, cfg, True, timeout_s=300)[0]
    name = "embed.weight" if "embed.weight" in want["grads"][0] else next(iter(want["grads"][0]))
    error = (got["grads"][0][name] - want["grads"][0][name]).norm() / want["grads"][0][name].norm()
    assert 0 < error < BF16_REDUCE_RTOL, error
    for g, w in zip(got["losses"], want["losses"], strict=True):
        assert math.isclose(g, w, rel_tol=BF16_REDUCE_RTOL)
