"""Where a worker stands: rank, world size, local rank and master address, read from whatever started it.

Every launcher sets its own variables; :func:`detect` reads them in this order and uses the first it finds:

==============  ===========================================================  =============================
launcher        rank / world / local rank / local world                      set by
==============  ===========================================================  =============================
``deepspeed``   ``RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE`` (+ ``CROSS_RANK``)  DeepSpeed's ``deepspeed``
``torchrun``    ``RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE``               torchrun, TorchElastic, the
                                                                             simulated cluster, Ray actors
``mpi``         ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``        Open MPI's ``mpirun``
``pmi``         ``PMI_RANK PMI_SIZE MPI_LOCALRANKID MPI_LOCALNRANKS``        MPICH / Intel MPI (Hydra)
``slurm``       ``SLURM_PROCID SLURM_NTASKS SLURM_LOCALID`` (+ tasks/node)   ``srun``
==============  ===========================================================  =============================

MASTER_ADDR / MASTER_PORT (where rank 0 hosts the rendezvous store):

- ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment always win (torchrun sets both; ``hecate sbatch``'s
  script and ``hecate train --launcher mpi`` set them for their workers).
- otherwise, when every rank runs on this node (local world == world), ``127.0.0.1``;
  on several nodes an unset ``MASTER_ADDR`` is an error naming the variable to set.
- otherwise the port is derived from the job's id (``SLURM_JOB_ID``, Open MPI's ``OMPI_MCA_ess_base_jobid``), so
  that every rank of one job computes the same port and two jobs rarely share one.

A launcher's variables that are partly missing, not integers or out of range (a rank beyond the world, more
ranks on this node than in the world) raise :class:`LaunchError` naming the variables.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from hecate.collectives.errors import HecateError

LOOPBACK = "127.0.0.1"
DERIVED_PORT_BASE = 20000  # ports derived from a job id fall in [BASE, BASE + SPAN): above the usual services,
DERIVED_PORT_SPAN = 20000  # below Linux's ephemeral range (32768+ overlaps; collisions there are rare but possible)


class LaunchError(HecateError):
    """The launcher's environment is missing, incomplete or inconsistent; the message names the variables."""


@dataclass(frozen=True)
class WorkerEnv:
    """One worker's place in the job."""

    launcher: str  # torchrun | mpi | pmi | slurm
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    agent_store: bool = False  # torchrun's agent hosts the store; workers only connect to it

    def describe(self) -> str:
        return (
            f"{self.launcher}: rank {self.rank} of {self.world_size}, local rank {self.local_rank} of "
            f"{self.local_world_size}, master {self.master_addr}:{self.master_port}"
        )


# (launcher, rank, world, local rank, local world) variable names, in the order they are tried
LAUNCHERS = (
    ("deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"),  # torchrun's names, but LOCAL_SIZE
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),  # local world from SLURM_TASKS_PER_NODE
)
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid")
# launchers that share another's rank variable are told apart by one variable only they set
MARKERS = {"deepspeed": "CROSS_RANK"}


def detect(environ: Mapping[str, str] | None = None) -> WorkerEnv:
    """The first launcher (in :data:`LAUNCHERS` order) whose rank variable is set decides; raises
    :class:`LaunchError` when none is set or its variables are incomplete or inconsistent."""
    environ = os.environ if environ is None else environ
    found = [spec for spec in LAUNCHERS if spec[1] in environ and MARKERS.get(spec[0], spec[1]) in environ]
    if not found:
        names = ", ".join(spec[1] for spec in LAUNCHERS)
        raise LaunchError(
            f"no launcher environment found (none of {names} is set): start workers with torchrun, "
            f"mpirun or srun, or use `hecate train --simulate N` / `--launcher mpi|ray`"
        )
    # the innermost launcher comes first: under `srun torchrun` or an sbatch script's `mpirun`, SLURM's variables
    # describe the outer step (SLURM_PROCID is the node's task), not this worker
    launcher, rank, world, local_rank, local_world = _place(found[0], environ)
    addr, port = _master(launcher, world, local_world, environ)
    agent_store = launcher == "torchrun" and environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return WorkerEnv(launcher, rank, world, local_rank, local_world, addr, port, agent_store)


def _place(spec, environ: Mapping[str, str]) -> tuple[str, int, int, int, int]:
    launcher, rank_var, world_var, local_var, local_world_var = spec
    missing = [v for v in (rank_var, world_var, local_var, local_world_var) if v and v not in environ]
    if launcher == "slurm" and "SLURM_TASKS_PER_NODE" not in environ and "SLURM_STEP_TASKS_PER_NODE" not in environ:
        missing.append("SLURM_STEP_TASKS_PER_NODE")
    if missing:
        raise LaunchError(
            f"{launcher} environment is incomplete: {rank_var} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not"
        )
    rank, world, local_rank = (_integer(environ, v) for v in (rank_var, world_var, local_var))
    if launcher == "slurm":
        local_world = _slurm_tasks_on_this_node(environ)
    else:
        local_world = _integer(environ, local_world_var)
    if world < 1:
        raise LaunchError(f"{world_var}={world}: the world size must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_var}={rank} is not a rank of a world of {world_var}={world} (0..{world - 1})")
    if not 1 <= local_world <= world:
        raise LaunchError(f"{launcher}: {local_world} ranks on this node, but the world has {world} ({world_var})")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{local_var}={local_rank} is not a local rank of {local_world} ranks on this node")
    return launcher, rank, world, local_rank, local_world


def _master(launcher: str, world: int, local_world: int, environ: Mapping[str, str]) -> tuple[str, int]:
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if local_world != world:
            raise LaunchError(
                f"{launcher}: the job spans several nodes ({world} ranks, {local_world} on this one) and "
                f"MASTER_ADDR is not set: set it to the address of rank 0's node (mpirun -x "
                f"MASTER_ADDR=HOST; `hecate sbatch` scripts set it)"
            )
        addr = LOOPBACK
    if "MASTER_PORT" in environ:
        port = _integer(environ, "MASTER_PORT")
    else:
        job = next((v for v in JOB_ID_VARIABLES if environ.get(v, "").isdigit()), None)
        if job is None:
            raise LaunchError(
                f"{launcher}: MASTER_PORT is not set and no job id ({', '.join(JOB_ID_VARIABLES)}) to "
                f"derive it from: set MASTER_PORT to a free port on rank 0's node"
            )
        port = DERIVED_PORT_BASE + int(environ[job]) % DERIVED_PORT_SPAN
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return addr, port


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``2(x3),1``) expanded, indexed by ``SLURM_NODEID``."""
    name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    counts = []
    for part in environ[name].split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchError(f"{name}={environ[name]!r}: expected counts like '4' or '2(x3),1'")
        counts += [int(match[1])] * int(match[2] or 1)
    node = _integer(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} but {name}={environ[name]!r} lists {len(counts)} node(s)")
    return counts[node]


def usable_cores() -> list[int]:
    """The cores this process may run on: its affinity (a launcher that binds ranks, a container's cpuset), or
    every core where the OS has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def loopback_interface() -> str:
    """The name of this machine's loopback interface (``lo`` on Linux), for ``GLOO_SOCKET_IFNAME`` and Open MPI's
    ``*_if_include``: a job whose ranks all run here then listens on loopback only, not on the address the
    hostname resolves to."""
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise LaunchError(
        f"no loopback interface among this machine's interfaces {names}: cannot keep a local job's "
        f"connections on loopback"
    )


def store_listener(address: str, port: int) -> tuple[int, dict[str, int]]:
    """(port, ``TCPStore`` keyword arguments) for the store's host: a store for a loopback address listens on
    loopback only, on ``port`` or (0) one the OS picks - the store alone binds every interface; for any other
    address, the store's own listener, as a multi-node job needs."""
    if not ipaddress.ip_address(socket.gethostbyname(address)).is_loopback:
        return port, {}
    listener = socket.create_server((address, port), backlog=1024)
    bound = listener.getsockname()[1]
    return bound, {"master_listen_fd": listener.detach()}  # the store owns the descriptor from here
