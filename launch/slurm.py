"""``hecate sbatch CONFIG --nodes N ...``: write a SLURM batch script that runs the job with ``srun`` (one task per
worker; each finds its rank in ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``), and with ``--submit``
hand it to ``sbatch``. The script is meant to be read and edited: ``#SBATCH`` lines, then where rank 0's
rendezvous store lives, then one ``srun`` line with every argument shell-quoted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hecate.collectives.errors import HecateError
from hecate.launch.environment import DERIVED_PORT_BASE, DERIVED_PORT_SPAN

# sbatch reads #SBATCH lines itself (no shell), so their values are checked instead of quoted
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.:,@+/%=-]+")


@dataclass
class BatchJob:
    """What the script asks SLURM for, and the worker command it runs."""

    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    workdir: Path
    output: Path
    worker_args: list[str]
    partition: str | None = None
    time: str | None = None
    account: str | None = None

    @property
    def workers(self) -> int:
        return self.nodes * self.tasks_per_node

    def sbatch_options(self) -> list[tuple[str, str]]:
        options = [
            ("job-name", self.job_name),
            ("nodes", str(self.nodes)),
            ("ntasks-per-node", str(self.tasks_per_node)),
        ]
        if self.gpus_per_node:
            options.append(("gpus-per-node", str(self.gpus_per_node)))
        for name in ("partition", "time", "account"):
            if getattr(self, name):
                options.append((name, getattr(self, name)))
        options += [("chdir", str(self.workdir)), ("output", str(self.output))]
        for name, value in options:
            if not SBATCH_VALUE.fullmatch(value):
                raise HecateError(
                    f"sbatch --{name}={value!r}: only letters, digits and _.:,@+/%=- are allowed in "
                    f"#SBATCH values (sbatch reads them without a shell)"
                )
        return options


def batch_script(job: BatchJob, command_line: str) -> str:
    """The script's text."""
    lines = [
        "#!/bin/bash",
        f"# Written by: {command_line}",
        f"# {job.workers} workers: {job.nodes} node(s) x {job.tasks_per_node} task(s)",
    ]
    lines += [f"#SBATCH --{name}={value}" for name, value in job.sbatch_options()]
    worker = [sys.executable, "-m", "hecate.launch.worker", *job.worker_args]
    srun = "srun --kill-on-bad-exit=1 " + " \\\n    ".join(_pairs(worker))
    lines += [
        "set -euo pipefail",
        "",
        "# rank 0's node hosts the rendezvous store; the port is derived from the job id so every node agrees",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT=$(( {DERIVED_PORT_BASE} + SLURM_JOB_ID % {DERIVED_PORT_SPAN} ))",
        "",
        "# one task per worker; a worker that fails ends the step (--kill-on-bad-exit)",
        srun,
        "",
    ]
    return "\n".join(lines)


def _pairs(argv: list[str]) -> list[str]:
    """Quote every argument; keep ``-o KEY=VALUE`` pairs on one line each."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("-o", "--override") and i + 1 < len(argv):
            out.append(f"{argv[i]} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            out.append(shlex.quote(argv[i]))
            i += 1
    head = " ".join(out[:4]) if len(out) >= 4 else " ".join(out)  # python -m hecate.launch.worker CONFIG
    return [head, *out[4:]]


def write_script(job: BatchJob, path: Path, command_line: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(batch_script(job, command_line))
    path.chmod(0o755)
    return path


def submit(path: Path) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise HecateError(
            f"sbatch was not found on PATH: SLURM is not installed here. The script is written to "
            f"{path}; submit it from a login node with `sbatch {path}`"
        )
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise HecateError(f"sbatch refused {path}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
