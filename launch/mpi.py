"""``hecate train CONFIG --launcher mpi --workers N``: Open MPI's ``mpirun`` starts N copies of
``python -m hecate.launch.worker CONFIG``; each finds its rank in ``OMPI_COMM_WORLD_*``
(:mod:`hecate.launch.environment`) and rank 0 hosts the rendezvous store at MASTER_ADDR:MASTER_PORT, which are
exported to every rank. A rank that exits non-zero makes mpirun stop the others.

Every rank runs on this node, so the job is kept on loopback: gloo's sockets (``GLOO_SOCKET_IFNAME``), MPI's own
TCP transport and the addresses mpirun's daemon channel advertises (``btl_tcp_if_include`` /
``oob_tcp_if_include``). Open MPI 4.1's daemon channel still binds its listening socket to every interface (its
``orte_oob_tcp_start_listening`` ignores the interface list for the bind); nothing connects to it from outside.

Stopping: mpirun puts each rank in a process group of its own, so a Ctrl-C in the terminal reaches mpirun but not
the ranks, and mpirun stops its ranks only when it is given time to. On Ctrl-C this launcher gives it
:data:`STOP_GRACE_S` (SIGTERM, then SIGKILL), then kills any rank still alive by the pid its heartbeat names; a
rank whose mpirun is gone ends itself (:mod:`hecate.launch.parent_watch`), and mpirun ends when this launcher
dies (``PR_SET_PDEATHSIG``). When the job fails, the error names the rank that died and where it was last seen.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from hecate.collectives.errors import HecateError
from hecate.collectives.heartbeat import RUN_SUBFOLDER, read_beats
from hecate.launch.environment import LOOPBACK, loopback_interface
from hecate.trainer.faults import ENV as FAULT_ENV

FORWARDED = ("PYTHONPATH", "OMP_NUM_THREADS", FAULT_ENV)  # exported to every rank when set here
STOP_GRACE_S = 10.0  # after Ctrl-C, how long mpirun may take to stop its ranks before it is killed
PR_SET_PDEATHSIG = 1  # prctl option from <linux/prctl.h>
# how mpirun reports the first rank that died: "mpirun noticed that process rank 1 with PID 4242 on node vm
# exited on signal 9 (Killed)."
NOTICED = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+) \(([^)]*)\)")


def mpirun_command(
    mpirun: str,
    workers: int,
    worker_args: list[str],
    master_port: int,
    hosts: str | None = None,
    master_addr: str = LOOPBACK,
) -> list[str]:
    """The command line: ``mpirun [--allow-run-as-root] --oversubscribe --bind-to none -np N -x ... python -m
    hecate.launch.worker ARGS``. Binding is left to torch (each worker sizes its own thread pool). Without
    ``hosts`` (every rank here) the job's TCP traffic is pinned to the loopback interface."""
    command = [mpirun]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")  # Open MPI refuses root without it (containers, CI)
    command += ["--oversubscribe", "--bind-to", "none", "-np", str(workers)]
    if hosts:
        command += ["--host", hosts]
    else:
        loopback = loopback_interface()
        command += [
            "--mca",
            "btl_tcp_if_include",
            loopback,
            "--mca",
            "oob_tcp_if_include",
            loopback,
            "-x",
            f"GLOO_SOCKET_IFNAME={loopback}",
        ]
    command += ["-x", f"MASTER_ADDR={master_addr}", "-x", f"MASTER_PORT={master_port}"]
    for name in FORWARDED:
        if name in os.environ:
            command += ["-x", name]
    return command + [sys.executable, "-m", "hecate.launch.worker", *worker_args]


def run_mpi(workers: int, worker_args: list[str], run_dir: Path | None = None) -> None:
    """Run the job on this node under mpirun; raises HecateError when mpirun is missing or the job failed.
    ``run_dir`` (the run folder) is where the ranks' heartbeats are read from, to name and stop them."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise HecateError(
            "--launcher mpi: mpirun was not found on PATH; install Open MPI (Debian: apt-get install "
            "openmpi-bin libopenmpi-dev) or use --simulate N / torchrun"
        )
    command = mpirun_command(mpirun, workers, worker_args, _free_port())
    # preexec_fn runs before this launcher starts a thread of its own here; it only calls prctl
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_die_with_parent
    )  # noqa: PLW1509
    noticed: list[re.Match] = []
    relay = threading.Thread(target=_relay_stderr, args=(process.stderr, noticed), daemon=True)
    relay.start()
    try:
        code = process.wait()
    except KeyboardInterrupt:
        _stop(process)
        _kill_leftover_ranks(run_dir, workers)
        raise
    finally:
        relay.join(timeout=STOP_GRACE_S)
    if code != 0:
        raise HecateError(
            f"{_who_failed(noticed, run_dir, workers)}mpirun exited with code {code}; each rank's log "
            f"is in the run folder's logs/"
        )


def _relay_stderr(stream, noticed: list[re.Match]) -> None:
    """Copy mpirun's stderr through, remembering its report of the first rank that died."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        match = NOTICED.search(line)
        if match:
            noticed.append(match)


def _who_failed(noticed: list[re.Match], run_dir: Path | None, workers: int) -> str:
    """``"rank 1 of 2 (pid 4242) was killed by signal 9 (Killed), last seen in step 3 at moe.router_sums; "``."""
    if not noticed:
        return ""
    rank, pid, _, signum, name = noticed[0].groups()
    beat = read_beats(run_dir / RUN_SUBFOLDER, workers).get(int(rank)) if run_dir else None
    if beat is not None and pid in ("0", str(beat.pid)):  # Open MPI 4.1 with PMIx may report PID 0
        pid, seen = str(beat.pid), f", last seen in step {beat.step} at {beat.op or 'start-up'}"
    else:
        seen = ""
    return f"rank {rank} of {workers} (pid {pid}) was killed by signal {signum} ({name}){seen}; "


def _stop(process: subprocess.Popen) -> None:
    """Give mpirun time to stop its ranks (the terminal's SIGINT may already have reached it), then SIGTERM, then
    SIGKILL."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            process.send_signal(sig)
        try:
            process.wait(STOP_GRACE_S / 2)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting politely
            continue


def _kill_leftover_ranks(run_dir: Path | None, workers: int) -> None:
    """SIGKILL every rank of this job still alive, by the pid its heartbeat names (checked to be a worker)."""
    if run_dir is None:
        return
    for beat in read_beats(run_dir / RUN_SUBFOLDER, workers).values():
        try:
            cmdline = Path(f"/proc/{beat.pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone
        if b"hecate.launch.worker" in cmdline:
            try:
                os.kill(beat.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _die_with_parent() -> None:
    """In mpirun's process, before exec: the kernel sends it SIGTERM when this launcher dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
