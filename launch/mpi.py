"""``hecate train CONFIG --launcher mpi --workers N``: Open MPI's ``mpirun`` starts N copies of
``python -m hecate.launch.worker CONFIG``; each finds its rank in ``OMPI_COMM_WORLD_*``
(:mod:`hecate.launch.environment`) and rank 0 hosts the rendezvous store at MASTER_ADDR:MASTER_PORT, which are
exported to every rank. A rank that exits non-zero makes mpirun stop the others.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from hecate.collectives.errors import HecateError
from hecate.launch.environment import LOOPBACK
from hecate.trainer.faults import ENV as FAULT_ENV

FORWARDED = ("PYTHONPATH", "OMP_NUM_THREADS", FAULT_ENV)  # exported to every rank when set here


def mpirun_command(mpirun: str, workers: int, worker_args: list[str], master_port: int,
                   hosts: str | None = None, master_addr: str = LOOPBACK) -> list[str]:
    """The command line: ``mpirun [--allow-run-as-root] --oversubscribe --bind-to none -np N -x ... python -m
    hecate.launch.worker ARGS``. Binding is left to torch (each worker sizes its own thread pool)."""
    command = [mpirun]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")  # Open MPI refuses root without it (containers, CI)
    command += ["--oversubscribe", "--bind-to", "none", "-np", str(workers)]
    if hosts:
        command += ["--host", hosts]
    command += ["-x", f"MASTER_ADDR={master_addr}", "-x", f"MASTER_PORT={master_port}"]
    for name in FORWARDED:
        if name in os.environ:
            command += ["-x", name]
    return command + [sys.executable, "-m", "hecate.launch.worker", *worker_args]


def run_mpi(workers: int, worker_args: list[str]) -> None:
    """Run the job on this node under mpirun; raises HecateError when mpirun is missing or the job failed."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise HecateError("--launcher mpi: mpirun was not found on PATH; install Open MPI (Debian: apt-get install "
                          "openmpi-bin libopenmpi-dev) or use --simulate N / torchrun")
    command = mpirun_command(mpirun, workers, worker_args, _free_port())
    code = subprocess.run(command).returncode
    if code != 0:
        raise HecateError(f"mpirun exited with code {code}; each rank's log is in the run folder's logs/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
