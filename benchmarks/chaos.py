"""Question: does a job under ``torchrun --max-restarts`` survive repeated faults and end with exactly the weights
of a run that was never interrupted, and how much work do the faults cost?

Two runs of the same small config, each ``torchrun --standalone --nproc-per-node W -m hecate.launch.worker``:

- the reference, untouched;
- the chaos run, with ``--max-restarts`` and ``--faults`` faults injected from outside at random steps (seeded).
  The injector finds every rank's pid and step in its heartbeat (``RUN_DIR/heartbeats``) and, cycling through
  ``--kinds``:

  ``kill``          SIGKILL of a random rank;
  ``stop``          SIGSTOP of a random rank, left stopped past ``train.collective_timeout_s``, so that its peers
                    give up; it gets SIGCONT once a peer has exited (torchrun's SIGTERM then ends it);
  ``kill-in-save``  SIGKILL of a random rank while an asynchronous checkpoint save is being written (its
                    ``.tmp-step_*`` folder exists); ``caught_in_save`` says whether the kill landed in one;
  ``read-only``     the checkpoint folder made unwritable (``chattr +i``; ``chmod`` when not root, since root
                    ignores modes) just before a checkpoint step, so that the save fails; writable again once
                    a rank has exited.

  After each fault torchrun restarts every worker; they resume from the last complete checkpoint by themselves.

Reported: faults injected and survived (the job came back in a new attempt and finished), restarts, steps
recomputed (per fault: the steps done when it struck, from the heartbeats, minus the step the next attempt resumed
from), wall time of both runs, and whether every tensor of the two final checkpoints is bit-for-bit equal.

    python benchmarks/chaos.py --json runs/bench/chaos.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from hecate.collectives.heartbeat import RUN_SUBFOLDER, Beat, read_beats
from hecate.trainer.data import prepare_data
from hecate.trainer.export import WEIGHTS_FILE, export_run

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("kill", "stop", "kill-in-save", "read-only")
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
    "checkpoint.async_save=true",
]
CORPUS = ("json", "email", "logging", "concurrent")  # a few packages of the standard library: prepared in seconds
POLL_S = 0.02  # heartbeats are rewritten every 0.1-0.5 s
SAVE_POLL_S = 0.001  # an asynchronous save of the small model lasts milliseconds
START_DEADLINE_S = 300.0  # a (re)started attempt's ranks all publish a heartbeat within this


@dataclass
class Fault:
    kind: str
    step: int  # strike once every rank of the attempt runs this step (or later)
    rank: int
    attempt: int = -1  # the attempt it struck
    done_steps: int = -1  # steps completed when it struck (the most advanced rank)
    resumed_from: int = -1  # the step the next attempt resumed from
    caught_in_save: bool | None = None
    survived: bool = False

    @property
    def recomputed(self) -> int:
        return max(0, self.done_steps - self.resumed_from) if self.survived else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--every", type=int, default=5, help="checkpoint.every")
    parser.add_argument("--timeout-s", type=float, default=8.0, help="train.collective_timeout_s")
    parser.add_argument("--layout", nargs="*", default=["parallel.ep=2"], help="extra -o overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chaos", help="a new subfolder per run")
    parser.add_argument("--json", type=Path, help="write the result to this file")
    args = parser.parse_args()
    if args.steps <= 2 * args.every:
        parser.error("--steps must exceed two checkpoint intervals (--every)")
    out = args.out / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True)
    data = out / "data"
    prepare_data(
        [sysconfig.get_paths()["stdlib"] + "/" + name for name in CORPUS],
        data,
        vocab_size=512,
        val_fraction=0.2,
        log=lambda _: None,
    )
    overrides = [
        f"data.dir={data}",
        *SMALL,
        *args.layout,
        f"train.steps={args.steps}",
        f"checkpoint.every={args.every}",
        f"train.collective_timeout_s={args.timeout_s:g}",
    ]

    started = time.monotonic()
    reference = torchrun(args.workers, 0, out / "reference", overrides)
    if reference.wait() != 0:
        sys.exit(f"the reference run failed (exit code {reference.returncode}); its logs: {out}/reference/logs")
    reference_s = time.monotonic() - started

    faults = schedule(args, random.Random(args.seed))
    run = out / "chaos"
    started = time.monotonic()
    job = torchrun(args.workers, len(faults) + 2, run, overrides)
    try:
        Injector(job, run, args.workers, args.every).run(faults)
        code = job.wait()
    finally:
        make_writable(run / "checkpoints")
        if job.poll() is None:
            job.kill()
    chaos_s = time.monotonic() - started

    identical, differing = same_weights(out / "reference", run, out)
    result = {
        "command": "python benchmarks/chaos.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workers": args.workers,
        "steps": args.steps,
        "checkpoint_every": args.every,
        "collective_timeout_s": args.timeout_s,
        "layout": args.layout,
        "seed": args.seed,
        "exit_code": code,
        "faults_injected": sum(f.attempt >= 0 for f in faults),
        "faults_survived": sum(f.survived for f in faults) if code == 0 else 0,
        "steps_recomputed": sum(f.recomputed for f in faults),
        "caught_in_save": sum(bool(f.caught_in_save) for f in faults),
        "bit_identical": identical,
        "differing_tensors": differing,
        "wall_s": {"reference": round(reference_s, 1), "chaos": round(chaos_s, 1)},
        "faults": [asdict(f) | {"recomputed": f.recomputed} for f in faults],
        "folder": str(out),
    }
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if code != 0 or not identical or result["faults_survived"] != len(faults):
        sys.exit(1)


def torchrun(workers: int, restarts: int, run: Path, overrides: list[str]) -> subprocess.Popen:
    command = [
        shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        str(workers),
        "--max-restarts",
        str(restarts),
        "--monitor-interval",
        "0.5",
        "-m",
        "hecate.launch.worker",
        str(ROOT / "examples" / "tiny.yaml"),
    ]
    for item in [*overrides, f"train.run_dir={run}"]:
        command += ["-o", item]
    log = open(run.parent / f"{run.name}.torchrun.log", "w")  # noqa: SIM115 - the child writes it until it ends
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def schedule(args: argparse.Namespace, rng: random.Random) -> list[Fault]:
    """``--faults`` faults at distinct random steps after the first checkpoint, kinds taken in turn (shuffled)."""
    kinds = [args.kinds[i % len(args.kinds)] for i in range(args.faults)]
    rng.shuffle(kinds)
    last = args.steps - args.every  # leave the last interval alone: a fault there is no different
    steps = sorted(rng.sample(range(args.every + 1, last + 1), args.faults))
    return [Fault(kind, step, rng.randrange(args.workers)) for kind, step in zip(kinds, steps)]


class Injector:
    """Strikes each fault in turn and follows the job into its next attempt."""

    def __init__(self, job: subprocess.Popen, run: Path, workers: int, every: int):
        self.job, self.run_dir, self.workers, self.every = job, run, workers, every
        self.attempt = 0

    def run(self, faults: list[Fault]) -> None:
        for fault in faults:
            beats = self.wait_for(self.attempt, self._strike_step(fault))
            if beats is None:
                return
            fault.attempt = self.attempt
            fault.done_steps = max(b.step for b in beats.values()) - 1
            victim = beats[fault.rank].pid
            if fault.kind in ("kill", "stop"):
                os.kill(victim, signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)
            elif fault.kind == "kill-in-save":
                fault.caught_in_save = self.kill_in_save(victim)
                fault.done_steps = max(b.step for b in self.beats(self.attempt).values()) - 1
            else:
                make_read_only(self.run_dir / "checkpoints")
            self.wait_for_exit(beats)
            if fault.kind == "stop":
                os.kill(victim, signal.SIGCONT)
            if fault.kind == "read-only":
                make_writable(self.run_dir / "checkpoints")
            self.attempt += 1
            restarted = self.wait_for(self.attempt, 0)
            if restarted is None:
                return
            fault.resumed_from = min(b.step for b in restarted.values()) - 1
            fault.survived = True
            print(
                f"fault {fault.kind} of rank {fault.rank} after step {fault.done_steps} (attempt "
                f"{fault.attempt}): resumed from step {fault.resumed_from}",
                flush=True,
            )

    def _strike_step(self, fault: Fault) -> int:
        """Save faults strike in the interval before a checkpoint step; the others at their own step."""
        if fault.kind == "read-only":
            return (fault.step - 1) // self.every * self.every + 1  # the next save is at the end of this interval
        return fault.step

    def beats(self, attempt: int) -> dict[int, Beat]:
        return {r: b for r, b in read_beats(self.run_dir / RUN_SUBFOLDER, self.workers).items() if b.attempt == attempt}

    def wait_for(self, attempt: int, step: int) -> dict[int, Beat] | None:
        """Every rank's beat once all of ``attempt`` run ``step`` or later; None when the job ended first."""
        deadline = time.monotonic() + START_DEADLINE_S
        while self.job.poll() is None:
            beats = self.beats(attempt)
            if len(beats) == self.workers and min(b.step for b in beats.values()) >= step:
                return beats
            if time.monotonic() > deadline and len(beats) < self.workers:
                raise RuntimeError(
                    f"attempt {attempt}: only ranks {sorted(beats)} started within {START_DEADLINE_S:.0f} s"
                )
            time.sleep(POLL_S)
        return None

    def wait_for_exit(self, beats: dict[int, Beat]) -> None:
        """Until some rank of the attempt has ended (torchrun then stops the others and restarts)."""
        while self.job.poll() is None and all(running(b.pid) for b in beats.values()):
            time.sleep(POLL_S)

    def kill_in_save(self, victim: int) -> bool:
        """SIGKILL ``victim`` while a save's temporary folder exists; after three checkpoint intervals without
        seeing one, kill it anyway. Returns whether the kill landed in a save."""
        checkpoints = self.run_dir / "checkpoints"
        start = min(b.step for b in self.beats(self.attempt).values())
        while (
            self.job.poll() is None and min(b.step for b in self.beats(self.attempt).values()) < start + 3 * self.every
        ):
            for _ in range(int(0.1 / SAVE_POLL_S)):
                if any(checkpoints.glob(".tmp-step_*")):
                    os.kill(victim, signal.SIGKILL)
                    return any(checkpoints.glob(".tmp-step_*"))
                time.sleep(SAVE_POLL_S)
        os.kill(victim, signal.SIGKILL)
        return False


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def make_read_only(folder: Path) -> None:
    """Root writes through permission bits: it gets the immutable attribute instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)


def make_writable(folder: Path) -> None:
    if not folder.exists():
        return
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def same_weights(reference: Path, chaos: Path, out: Path) -> tuple[bool, list[str]]:
    """Export both runs' final checkpoints and compare every tensor bit for bit."""
    tensors = []
    for run in (reference, chaos):
        export_run(run, out / f"{run.name}-export")
        tensors.append(load_file(out / f"{run.name}-export" / WEIGHTS_FILE))
    ref, got = tensors
    differing = sorted(set(ref) ^ set(got)) + [
        name
        for name in sorted(set(ref) & set(got))
        if not torch.equal(ref[name].view(torch.uint8).flatten(), got[name].view(torch.uint8).flatten())
    ]
    return not differing, differing


def table(result: dict) -> str:
    lines = [f"{'#':>2} {'kind':<13} {'rank':>4} {'attempt':>7} {'after step':>10} {'resumed':>7} {'recomputed':>10}"]
    for i, f in enumerate(result["faults"]):
        lines.append(
            f"{i:>2} {f['kind']:<13} {f['rank']:>4} {f['attempt']:>7} {f['done_steps']:>10} "
            f"{f['resumed_from']:>7} {f['recomputed']:>10}"
            + ("" if f["caught_in_save"] is None else f"  in a save: {f['caught_in_save']}")
        )
    lines.append(
        f"faults injected {result['faults_injected']}, survived {result['faults_survived']}, steps "
        f"recomputed {result['steps_recomputed']}; final weights bit-identical to the uninterrupted run: "
        f"{result['bit_identical']}; wall {result['wall_s']['chaos']} s vs {result['wall_s']['reference']} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
