"""The single-process trainer: it learns, resumes exactly, refuses bad state, and stops on non-finite values."""

import json
import subprocess
import sys

import pytest
import torch

from hecate.collectives.errors import HecateError
from hecate.launch.cli import main
from hecate.parallel.errors import CheckpointError
from hecate.trainer import checkpoint as ckpt
from hecate.trainer.config import load_config
from hecate.trainer.errors import TrainingError
from hecate.trainer.metrics import read_metrics
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow  # starts processes

EXAMPLE = "examples/tiny.yaml"
FAST = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=64",
    "moe.ffn_dim=64",
    "model.dense_ffn_dim=128",
    "train.global_batch=8",
    "train.eval_batches=2",
    "logging.progress=false",
]


def config(tmp_path, data, *overrides):
    return load_config(EXAMPLE, [f"data.dir={data}", f"train.run_dir={tmp_path / 'run'}", *overrides])


def test_demo_config_trains_and_loss_falls(tmp_path, small_data):
    cfg = config(tmp_path, small_data, "train.steps=12", "train.eval_every=6", "checkpoint.every=6")
    summary = Trainer(cfg).run()
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 0.5
    for key in (
        "loss",
        "lm_loss",
        "aux_loss",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "expert_load",
        "expert_imbalance",
    ):
        assert key in steps[0], key
    assert sorted(steps[0]["expert_load"]) == ["0", "1", "2", "3"]
    assert sum(steps[0]["expert_load"]["0"]) == cfg.train.global_batch * cfg.model.seq_len * cfg.moe.top_k
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and 0 < summary["val_bpb"] < 8
    run = tmp_path / "run"
    for name in ("config.yaml", "loss.png", "expert_load.png", "summary.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert [p.name for p in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step_00000006", "step_00000012"]


def test_resume_gives_identical_losses(tmp_path, small_data, monkeypatch):
    common = [
        "train.steps=8",
        "checkpoint.every=3",
        "train.eval_every=0",
        "logging.plots=false",
        "logging.tensorboard=false",
        *FAST,
    ]
    Trainer(config(tmp_path / "a", small_data, *common)).run()
    reference = [r["loss"] for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]

    original = Trainer.train_step

    def crash_at_step_5(self, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return original(self, step)

    cfg = config(tmp_path / "b", small_data, *common)
    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(cfg, resume=True).run()
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert resumed == reference  # bit-identical: the batch, lr and state of each step are restored exactly


def test_checkpoint_of_another_model_is_rejected(tmp_path, small_data):
    Trainer(config(tmp_path, small_data, "train.steps=1", *FAST)).run()
    other = config(tmp_path, small_data, "train.steps=2", *FAST, "model.dim=32", "model.n_heads=2")
    with pytest.raises(CheckpointError, match="model.dim: saved 64, now 32"):
        Trainer(other, resume=True)


def test_existing_run_needs_resume_or_fresh(tmp_path, small_data):
    cfg = config(tmp_path, small_data, "train.steps=1", *FAST)
    Trainer(cfg).run()
    with pytest.raises(HecateError, match="--resume"):
        Trainer(cfg)
    assert Trainer(cfg, fresh=True).step == 0


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_data, monkeypatch):
    cfg = config(tmp_path, small_data, "train.steps=4", "checkpoint.every=2", *FAST)
    original = Trainer.train_step

    def poison_at_step_3(self, step):
        if step == 2:
            with torch.no_grad():
                self.model.tok_emb.weight.fill_(float("inf"))
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", poison_at_step_3)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 3"):
        Trainer(cfg).run()
    kept = ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000002"]
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 2 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_generate_samples_from_latest_checkpoint(tmp_path, small_data, capsys):
    Trainer(config(tmp_path, small_data, "train.steps=2", *FAST)).run()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "import json\n", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import json\n") and len(out) > len("import json\n")


def test_interrupted_save_leaves_previous_checkpoint_in_use(tmp_path, small_data):
    trainer = Trainer(config(tmp_path, small_data, "train.steps=2", "checkpoint.every=1", *FAST))
    trainer.run()
    root = tmp_path / "run" / "checkpoints"
    half = root / "step_00000009"  # a save that died before its COMPLETE marker
    half.mkdir()
    (half / "trainer_state.json").write_text(json.dumps({"step": 9}))
    assert ckpt.latest_checkpoint(root).name == "step_00000002"


@pytest.mark.parametrize(
    "args, says",
    [
        (["-o", "moe.num_expert=3"], "config field 'moe.num_expert': unknown key"),
        (["-o", "data.dir=DATA", "-o", "model.seq_len=100000"], "model.seq_len"),
        (["-o", "data.dir=NEW", "-o", "data.inputs=[EMPTY]"], "EMPTY"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, small_data, args, says):
    (tmp_path / "empty").mkdir()
    args = [
        a.replace("DATA", str(small_data))
        .replace("NEW", str(tmp_path / "new"))
        .replace("EMPTY", str(tmp_path / "empty"))
        for a in args
    ]
    says = says.replace("EMPTY", str(tmp_path / "empty"))
    proc = subprocess.run(
        [sys.executable, "-m", "hecate.launch.cli", "train", EXAMPLE, "-o", f"train.run_dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
