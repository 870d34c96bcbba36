"""``hecate train --simulate N``: the real command, real worker processes. It trains and resumes under a parallel
layout; bad layouts are refused before any worker starts; a worker that raises, dies or is interrupted takes
the whole job down with its rank named and nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hecate.launch.environment import usable_cores
from hecate.launch.simulate import core_sets
from hecate.trainer.faults import ENV as FAULT_ENV

pytestmark = pytest.mark.slow  # starts processes

EXAMPLE = "examples/tiny.yaml"
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=32",
    "moe.num_experts=4",
    "moe.ffn_dim=64",
    "model.dense_ffn_dim=128",
    "train.global_batch=8",
    "train.eval_batches=2",
    "train.eval_every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.plots=false",
]
FAILURE_DEADLINE_S = 60  # start-up of 4 workers (~10 s here) plus the 10 s the launcher allows to stop them


def hecate(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hecate.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def train_args(data: Path, run: Path, *overrides: str) -> list[str]:
    args = ["train", EXAMPLE]
    for item in [f"data.dir={data}", f"train.run_dir={run}", *SMALL, *overrides]:
        args += ["-o", item]
    return args


def worker_cores(run: Path) -> list[list[int]]:
    """The cores each rank's log says it runs on, by rank."""
    return [
        json.loads(log.read_text().split(" on cores ")[1].split(" with ")[0])
        for log in sorted((run / "logs").glob("rank*.log"))
    ]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def worker_pids(run: Path) -> list[int]:
    pids = []
    for log in sorted((run / "logs").glob("rank*.log")):
        for line in log.read_text().splitlines():
            if "(pid " in line:
                pids.append(int(line.split("(pid ")[1].split(")")[0]))
    return pids


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"worker pid {pid} still running"
            time.sleep(0.2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "world, layout",
    [
        (4, ["parallel.ep=2"]),  # DP=4 folded as EDP=2 x EP=2: experts saved as DTensors sharded over ep
        (2, ["fssdp.policy=fssdp", "fssdp.reshard_every=2"]),  # owners move at steps 2 and 4, across the resume
    ],
    ids=["dp4-ep2", "fssdp-reshard"],
)
def test_simulated_run_resumes_identically(small_data, tmp_path, world, layout):
    """The straight run binds its ranks to cores, the resumed one leaves them free: the losses are the same."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = hecate(
        *train_args(small_data, straight, *layout, "train.steps=6", "checkpoint.every=3"),
        "--simulate",
        str(world),
        "--sim-bind-cores",
    )
    assert done.returncode == 0, done.stderr
    assert "done: 6 steps" in done.stdout
    assert sorted(p.name for p in (straight / "logs").iterdir()) == [f"rank{r}.log" for r in range(world)]
    assert len(set(worker_pids(straight))) == world
    assert worker_cores(straight) == core_sets(world, usable_cores())

    first = hecate(
        *train_args(small_data, resumed, *layout, "train.steps=3", "checkpoint.every=3"), "--simulate", str(world)
    )
    assert first.returncode == 0, first.stderr
    second = hecate(
        *train_args(small_data, resumed, *layout, "train.steps=6", "checkpoint.every=3"),
        "--simulate",
        str(world),
        "--resume",
    )
    assert second.returncode == 0, second.stderr
    assert losses(resumed) == losses(straight)

    if world == 2:  # a corrupt newest checkpoint is named and the one before it used; none usable: one line
        resume = [
            *train_args(small_data, straight, *layout, "train.steps=6", "checkpoint.every=3"),
            "--simulate",
            str(world),
            "--resume",
        ]
        previous, newest = sorted((straight / "checkpoints").glob("step_*"))[-2:]
        truncate(newest / "__0_0.distcp")
        fallback = hecate(*resume)
        assert fallback.returncode == 0, fallback.stderr
        assert f"{newest} is corrupt: __0_0.distcp" in fallback.stderr, fallback.stderr
        assert f"resumed from {previous}" in fallback.stderr, fallback.stderr
        for folder in (straight / "checkpoints").glob("step_*"):  # the fallback run saved a new step 6
            truncate(folder / "__0_0.distcp")
        bad = hecate(*resume)
        assert bad.returncode == 2 and "__0_0.distcp" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.ep=3"], 3, "moe.num_experts=4 must be divisible by parallel.ep=3"),
        (["parallel.ep=4"], 2, "parallel.ep=4 x parallel.etp=1 must divide"),
        (["parallel.dp=3"], 4, "parallel.dp=3"),
        (["train.global_batch=6"], 4, "train.global_batch=6"),
        ([], 1000, "--simulate 1000"),
        (["collectives.transport=mpi"], 2, "'collectives.transport': mpi needs workers started by mpirun"),
        (["collectives.transport=cupy"], 2, "the cupy NCCL transport needs"),  # no cupy / no GPU here
        (
            ["parallel.pp=2", "train.grad_accum=2", "parallel.pp_stage_blocks=[1,2]"],
            2,
            "parallel.pp_stage_blocks=[1, 2] must give the blocks of each of the 2 stages",
        ),
    ],
)
def test_bad_layout_is_refused_before_any_worker_starts(small_data, tmp_path, overrides, world, message):
    run = tmp_path / "run"
    result = hecate(*train_args(small_data, run, *overrides), "--simulate", str(world), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    "kind, cause",
    [("raise", "InjectedFault: injected fault on rank 2 at step 2"), ("kill", "was killed by signal SIGKILL")],
)
def test_failing_worker_stops_the_job_with_its_rank(small_data, tmp_path, kind, cause):
    run = tmp_path / "run"
    started = time.monotonic()
    result = hecate(
        *train_args(small_data, run, "parallel.ep=2", "train.steps=50"),
        "--simulate",
        "4",
        env={FAULT_ENV: f"{kind}@2:2"},
        timeout=120,
    )
    assert time.monotonic() - started < FAILURE_DEADLINE_S
    # the fault strikes as step 2 begins, right after step 1's record: the job is gone within 30 s of it
    assert time.time() - (run / "metrics.jsonl").stat().st_mtime < 30
    assert result.returncode == 2
    assert "rank 2 of 4" in result.stderr and cause in result.stderr
    assert_all_gone(worker_pids(run))


def test_ctrl_c_stops_every_worker(small_data, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hecate.launch.cli",
            *train_args(small_data, run, "parallel.ep=2", "train.steps=10000"),
            "--simulate",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (run / "logs").exists() or len(worker_pids(run)) < 4:
        assert time.monotonic() < deadline and process.poll() is None, "workers did not start"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert_all_gone(worker_pids(run))
