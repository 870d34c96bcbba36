"""Checkpoints: saved under one layout, loaded under another (world size, EP degree, FSSDP owners) and continued
with the losses the un-resharded run gives; atomic under faults (a kill mid-save leaves the previous checkpoint in
use, torchrun restarts resume by themselves); corrupt, partial or foreign checkpoints refused with one error that
names what is wrong, without unpickling anything but plain data; export/import; non-finite steps stopped or skipped
naming the layer; same seed, same losses.

Every run here trains the same small model on the same data (``SMALL``), so every layout's losses are those of
the single-process reference run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parity import RTOL
from safetensors.torch import load_file
from test_launch_cluster import ray_head  # noqa: F401  (a Ray head on loopback, stopped by process id)
from test_simulate_cli import EXAMPLE, SMALL, hecate, losses, train_args

from hecate.launch.cli import main
from hecate.launch.errors import WorkerFailure
from hecate.launch.simulate import run_workers, start_workers
from hecate.launch.worker import run_from_environment
from hecate.parallel.errors import CheckpointError
from hecate.parallel.parallelize import Parallel
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import config_from_dict, load_config
from hecate.trainer.errors import TrainingError
from hecate.trainer.export import WEIGHTS_FILE
from hecate.trainer.faults import ENV as FAULT_ENV
from hecate.trainer.metrics import read_metrics
from hecate.trainer.plan import layout_of
from hecate.trainer.train import RUN_MARKER, Trainer

pytestmark = pytest.mark.slow  # starts processes

BASE = ["train.grad_accum=2"]  # two micro-batches: pipeline parallelism needs at least pp of them
FSSDP2 = ["fssdp.policy=fssdp", "fssdp.reshard_every=2"]  # owners move after step 2: heterogeneous owners
EVERY_2 = ["checkpoint.every=2", "checkpoint.keep=3"]
EVERY_1 = ["checkpoint.every=1", "checkpoint.keep=3"]
KILL_TO_EXIT_S = 30  # the bound: a killed worker ends the job this soon, naming its rank
JOB_DEADLINE_S = 300


def config(data: Path, run: Path, *overrides: str):
    return load_config(EXAMPLE, [f"data.dir={data}", f"train.run_dir={run}", *SMALL, *BASE, *overrides])


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def assert_continues(run: Path, reference: dict[int, float], steps: range) -> None:
    got = step_losses(run)
    for step in steps:
        assert got[step] == pytest.approx(reference[step], rel=RTOL), (run, step, got[step], reference[step])


def simulate_2(cfg, resume: bool = False, fault: str | None = None) -> None:
    """What ``hecate train --simulate 2`` runs, started from this process: the same two workers, without the cost
    of a CLI process (tests/test_simulate_cli.py tests the CLI itself)."""
    start_workers(
        run_from_environment, 2, (cfg.to_dict(), resume), backend=None, env={FAULT_ENV: fault} if fault else None
    ).join(JOB_DEADLINE_S)


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """The single-process run: 6 steps, checkpoints after every second step (kept)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(config(small_data, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=10")).run()
    return run


@pytest.fixture(scope="module")
def fssdp_straight(small_data, tmp_path_factory) -> Path:
    """FSSDP on 2 simulated ranks, uninterrupted, saving in the background (checkpoint.async_save)."""
    run = tmp_path_factory.mktemp("fssdp") / "run"
    simulate_2(config(small_data, run, *FSSDP2, *EVERY_2, "train.steps=4", "checkpoint.async_save=true"))
    return run


# ---- resharding ------------------------------------------------------------------------------------------------


def train_hops(hops: list[tuple[dict, bool]]) -> None:
    """One rank of a simulated job that trains several layouts in turn, each resuming the run folder it names."""
    for cfg_dict, resume in hops:
        cfg = config_from_dict(cfg_dict)
        parallel = Parallel.from_world(
            layout_of(cfg, torch.distributed.get_world_size()), cfg.parallel, cfg.moe, cfg.fssdp
        )
        Trainer(cfg, resume=resume, parallel=parallel).run()


def copy_checkpoint(source: Path, step: int, run: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, run / "checkpoints" / name)
    (run / RUN_MARKER).touch()  # a run folder Hecate may resume into


def test_checkpoints_reshard_across_layouts_and_continue_the_reference(small_data, tmp_path, reference, fssdp_straight):
    """One 4-rank job trains every hop; a hop that only passes its state on runs one step (the next hop's losses
    check it: the loss after a step shows the update made with the loaded optimizer moments), a last hop two."""
    ref = step_losses(reference)
    chain, from_fssdp, pp_ep, tp_ep = (tmp_path / name for name in ("chain", "from_fssdp", "pp_ep", "tp_ep"))
    copy_checkpoint(reference, 2, chain)  # saved by one process
    copy_checkpoint(fssdp_straight, 2, from_fssdp)  # saved by FSSDP on 2 ranks, owners moved after step 2

    def hop(run: Path, steps: int, *layout: str, resume: bool = True) -> tuple[dict, bool]:
        return config(small_data, run, *layout, f"train.steps={steps}", *EVERY_1).to_dict(), resume

    run_workers(
        train_hops,
        4,
        [
            hop(chain, 3, "parallel.ep=4"),  # one process -> EP4
            hop(chain, 4, "parallel.ep=2"),  # EP4 -> EP2
            hop(from_fssdp, 3, "parallel.ep=4"),  # FSSDP2 (moved owners) -> EP4
            hop(pp_ep, 1, "parallel.pp=2", "parallel.ep=2", resume=False),
            hop(pp_ep, 3, "parallel.ep=4"),  # PP2xEP2 -> EP4
            hop(tp_ep, 1, "parallel.tp=2", "parallel.ep=2", resume=False),
            hop(tp_ep, 3),
        ],  # TP2xEP2 -> DP4
        timeout_s=JOB_DEADLINE_S,
    )
    assert_continues(chain, ref, range(3, 5))
    assert_continues(from_fssdp, ref, range(3, 4))
    assert_continues(pp_ep, ref, range(1, 4))
    assert_continues(tp_ep, ref, range(1, 4))

    back = Trainer(config(small_data, from_fssdp, "train.steps=5", *EVERY_1), resume=True)  # EP4 -> one process
    assert back.step == 3
    back.run()
    assert_continues(from_fssdp, ref, range(4, 6))

    exported = tmp_path / "export"  # the EP2 checkpoint (4 ranks) as one file with every expert
    assert main(["export", str(chain), "--out", str(exported)]) == 0
    single = Trainer(config(small_data, chain, "train.steps=6", *EVERY_1), resume=True)  # EP2 -> one process
    weights = load_file(exported / WEIGHTS_FILE)
    for name, tensor in single.model.state_dict().items():
        if name in weights:
            assert torch.equal(weights[name], tensor), name
    single.run()
    assert_continues(chain, ref, range(5, 7))


# ---- faults ----------------------------------------------------------------------------------------------------


def test_kill_during_save_keeps_previous_checkpoint_and_resume_matches_uninterrupted(
    small_data, tmp_path, fssdp_straight, caplog, capfd
):
    run = tmp_path / "run"
    cfg = config(small_data, run, *FSSDP2, *EVERY_2, "train.steps=4")
    with pytest.raises(WorkerFailure, match="rank 1 of 2 was killed by signal SIGKILL"):
        simulate_2(cfg, fault="kill@1:save4")
    ended = time.time()
    # the step-4 record is written just before the save in which rank 1 dies: an upper bound on the time since
    assert ended - (run / "metrics.jsonl").stat().st_mtime < KILL_TO_EXIT_S
    assert [p.name for p in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step_00000002"]
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()  # the interrupted save, never completed
    with caplog.at_level(logging.WARNING, logger="hecate.trainer.checkpoint"):
        assert Trainer(config(small_data, run, "train.steps=4"), resume=True).step == 2
    assert "ignoring incomplete checkpoint" in caplog.text and ".tmp-step_00000004" in caplog.text

    capfd.readouterr()
    simulate_2(cfg, resume=True)
    assert "step_00000002 (step 2)" in capfd.readouterr().err  # rank 0's console: "resumed from ..."
    assert losses(run) == losses(fssdp_straight)  # bit-identical to the run that was never interrupted


def test_torchrun_max_restarts_resumes_from_last_checkpoint(small_data, tmp_path, fssdp_straight):
    torchrun = Path(sys.executable).parent / "torchrun"
    run = tmp_path / "run"
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "-m",
            "hecate.launch.worker",
            *train_args(small_data, run, *BASE, *FSSDP2, *EVERY_2, "train.steps=4")[1:],
        ],
        capture_output=True,
        text=True,
        timeout=JOB_DEADLINE_S,
        env={**os.environ, FAULT_ENV: "kill@1:3"},
    )  # dies mid-step 3 in the first attempt only
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step_00000002 (step 2)" in done.stdout + done.stderr  # the restarted rank 0: "resumed from ..."
    assert losses(run) == losses(fssdp_straight)


def test_ray_max_restarts_resumes_from_last_checkpoint(small_data, tmp_path, fssdp_straight, ray_head):  # noqa: F811
    run = tmp_path / "run"
    done = hecate(
        *train_args(small_data, run, *BASE, *FSSDP2, *EVERY_2, "train.steps=4"),
        "--launcher",
        "ray",
        "--address",
        ray_head,
        "--workers",
        "2",
        "--max-restarts",
        "1",
        env={FAULT_ENV: "kill@1:3"},
        timeout=JOB_DEADLINE_S,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "rank 1 of 2 failed" in done.stdout + done.stderr
    assert "restarting the workers (1 of 1)" in done.stdout + done.stderr
    assert losses(run) == losses(fssdp_straight)


# ---- what a checkpoint must be to load ------------------------------------------------------------------------


@pytest.fixture()
def fresh(small_data, tmp_path):
    """A model and optimizer of the reference's config, and a copy of the reference's step-2 checkpoint."""

    def make(reference: Path, *overrides: str) -> tuple[Trainer, Path]:
        copy_checkpoint(reference, 2, tmp_path / "copy")
        trainer = Trainer(config(small_data, tmp_path / "new", *overrides))
        return trainer, tmp_path / "copy" / "checkpoints" / "step_00000002"

    return make


def load_into(trainer: Trainer, path: Path) -> None:
    ckpt.load_checkpoint(path, trainer.model, trainer.optimizer, expect=trainer.checkpoint_identity())


def test_truncated_checkpoint_file_is_refused_naming_it(reference, fresh):
    trainer, path = fresh(reference)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"file __0_0.distcp is truncated \(\d+ bytes, needs \d+\)"):
        load_into(trainer, path)


def test_checkpoint_with_other_shapes_is_refused_naming_the_tensor(reference, fresh):
    trainer, path = fresh(reference, "moe.ffn_dim=32")
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    state["moe"]["ffn_dim"] = 32  # a checkpoint whose label says one shape and whose tensors hold another
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(
        CheckpointError,
        match=r"model.blocks.0.ffn.experts.w1 has shape \[4, 64, 64\], this model "
        r"needs \[4, 64, 32\]",
    ):
        load_into(trainer, path)


def test_checkpoint_of_another_model_config_is_refused_before_reading_tensors(reference, fresh):
    trainer, path = fresh(reference, "model.dim=32")
    with pytest.raises(CheckpointError, match="written for another model: model.dim: saved 64, now 32"):
        load_into(trainer, path)


def test_load_that_misses_experts_fails_loudly(reference, fresh):
    trainer, path = fresh(reference)
    index = path / ckpt.METADATA_FILE
    metadata = pickle.loads(index.read_bytes())  # the test's own file: trusted
    entry = metadata.state_dict_metadata["model.blocks.1.ffn.experts.w2"]
    chunk = entry.chunks[0]
    entry.chunks = [type(chunk)(offsets=chunk.offsets, sizes=torch.Size([2, *chunk.sizes[1:]]))]  # experts 0, 1
    index.write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        CheckpointError,
        match=r"does not cover every expert .*blocks.1.ffn.experts.w2 lacks "
        r"experts \[2, 3\]",
    ):
        load_into(trainer, path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_index_is_not_unpickled_beyond_plain_data(reference, fresh, tmp_path, monkeypatch):
    trainer, path = fresh(reference)
    monkeypatch.chdir(tmp_path)
    (path / ckpt.METADATA_FILE).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="posix.system is not allowed in a checkpoint index"):
        load_into(trainer, path)
    assert not (tmp_path / "PWNED").exists()


# ---- export / import -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory) -> Path:
    """The reference run's last checkpoint, exported by ``hecate export``."""
    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["export", str(reference), "--out", str(out)]) == 0
    return out


def test_export_then_init_from_starts_with_the_exported_weights(small_data, tmp_path, exported):
    out = exported
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["step"] == 6 and config_json["moe"]["num_experts"] == 4
    weights = load_file(out / WEIGHTS_FILE)
    assert list(weights["blocks.0.ffn.experts.w1"].shape) == config_json["parameters"]["blocks.0.ffn.experts.w1"]
    assert (out / "tokenizer.json").is_file()

    started = Trainer(config(small_data, tmp_path / "init", f"train.init_from={out}", "train.steps=1"))
    for name, tensor in started.model.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name
    assert (
        started.run()["val_loss"] < Trainer(config(small_data, tmp_path / "scratch", "train.steps=1")).run()["val_loss"]
    )

    with pytest.raises(CheckpointError, match="model.dim: saved 64, now 32"):
        Trainer(config(small_data, tmp_path / "other", f"train.init_from={out}", "model.dim=32"))


def test_init_from_another_model_is_refused_before_any_worker_starts(small_data, tmp_path, exported, capsys):
    run = tmp_path / "run"
    init_from = ["--init-from", str(exported)]
    for source, overrides, message in [
        (
            init_from,
            ["model.dim=32", "moe.num_experts=8"],
            "written for another model: model.dim: saved 64, now 32; moe.num_experts: saved 4, now 8",
        ),
        (init_from, ["moe.num_experts=8"], "written for another model: moe.num_experts: saved 4, now 8"),
        ([], [f"train.init_from={tmp_path / 'nothing'}"], "not an exported model (no config.json or model.safetensors"),
    ]:
        assert main([*train_args(small_data, run, *overrides), *source, "--simulate", "2"]) == 2
        assert message in capsys.readouterr().err
        assert not run.exists()  # refused before the run folder (and any worker) was made


# ---- non-finite values -----------------------------------------------------------------------------------------


class NanInBackward(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(trainer: Trainer, at_step: int, where: str) -> None:
    """A NaN at one step only, in the output of blocks.1.attn.proj or in the gradient flowing back into it.
    Prepended, so that the tracer's own hook on that module sees it."""
    nan = (lambda out: out * float("nan")) if where == "output" else NanInBackward.apply

    def hook(_module, _inputs, output):
        return nan(output) if trainer.step == at_step - 1 else output

    trainer.model.get_submodule("blocks.1.attn.proj").register_forward_hook(hook, prepend=True)


@pytest.mark.parametrize(
    "where, names", [("output", "blocks.1.attn.proj"), ("gradient", "the gradient of blocks.1.attn.proj.weight")]
)
def test_nonfinite_stop_names_step_and_layer_and_saves_nothing_after(small_data, tmp_path, where, names):
    trainer = Trainer(config(small_data, tmp_path / "run", "train.steps=4", "checkpoint.every=1"))
    poison(trainer, 3, where)
    with pytest.raises(TrainingError, match=rf"non-finite .* at step 3.*first non-finite value in {names};"):
        trainer.run()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")] == [
        "step_00000001",
        "step_00000002",
    ]


def test_nonfinite_skip_drops_the_update_and_goes_on(small_data, tmp_path, reference):
    run = tmp_path / "run"
    trainer = Trainer(
        config(small_data, run, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=5", "train.nonfinite=skip")
    )
    poison(trainer, 3, "output")
    trainer.run()
    records = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert records[3]["skipped_nonfinite"] == "blocks.1.attn.proj"
    assert [s for s, r in records.items() if "skipped_nonfinite" in r] == [3]
    assert all(torch.isfinite(torch.tensor(records[s]["loss"])) for s in (1, 2, 4))
    before, after = (Trainer(config(small_data, tmp_path / f"probe{s}")) for s in (2, 3))
    for probe, step in ((before, 2), (after, 3)):
        load_into(probe, run / "checkpoints" / f"step_{step:08d}")
    for (name, a), b in zip(before.model.state_dict().items(), after.model.state_dict().values()):
        assert torch.equal(a, b), name  # the skipped step changed nothing: no poisoned state was saved


# ---- determinism and keeping the last K ------------------------------------------------------------------------


def test_same_seed_same_layout_gives_identical_losses_and_keeps_last_k(small_data, tmp_path, reference):
    run = tmp_path / "run"
    Trainer(config(small_data, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2")).run()
    assert [r.get("loss") for r in read_metrics(run)] == [r.get("loss") for r in read_metrics(reference)]
    assert [p.name for p in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step_00000004", "step_00000006"]
