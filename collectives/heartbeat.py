"""Where each rank was last seen: a heartbeat file per rank, so that a rank whose collective times out can name the
peers that never arrived (a stopped or slow rank) instead of only itself, and a launcher or a fault injector can
read every rank's pid and step without talking to it.

Every transport operation calls :func:`note` when it is issued (through :class:`CommStats`), which costs a counter
increment. A daemon thread of each rank writes ``{rank, pid, attempt, step, op, ops, time}`` to
``FOLDER/rankR.json`` (write + rename: a reader never sees half a file) whenever it changed and at least every
:data:`PERIOD_S`. A stopped process (SIGSTOP, swapped out, stuck outside Python) stops writing: its ``time`` goes
stale. A rank that is alive but behind has issued fewer operations (``ops``) than its peers.

Files are read by rank from one folder: ranks of one node always see each other; across nodes only where the
folder is on a shared filesystem (the run folder usually is). ``time`` is the writer's wall clock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RUN_SUBFOLDER = "heartbeats"  # where launched workers publish theirs: RUN_DIR/heartbeats/rankR.json
PERIOD_S = 0.5  # a live rank rewrites its file at least this often
STALE_S = 5.0  # a heartbeat older than this comes from a rank that stopped running (ten missed periods)


@dataclass(frozen=True)
class Beat:
    """One rank's last published state."""

    rank: int
    pid: int
    attempt: int  # the launcher's restart count: beats of an earlier attempt are not this job's
    step: int  # the optimizer step being run (counted from 1)
    op: str | None  # name of the last collective issued ("moe.router_sums"), None before the first
    ops: int  # collectives this process issued so far
    time: float  # wall clock of the write

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.time


class _Collectives:
    """The last collective this process issued, and how many; written by :func:`note`."""

    op: str | None = None
    count: int = 0


def note(name: str) -> None:
    """A collective named ``name`` was issued by this process (called by every transport, via CommStats)."""
    _Collectives.op = name
    _Collectives.count += 1


def beat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.json"


class Heartbeat:
    """Publishes this rank's :class:`Beat` from a daemon thread until :meth:`stop`."""

    def __init__(self, folder: Path, rank: int, attempt: int, step_of: Callable[[], int]):
        self.folder = folder
        self.rank = rank
        self.attempt = attempt
        self._step_of = step_of
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hecate-heartbeat-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> Beat:
        return Beat(
            self.rank, os.getpid(), self.attempt, self._step_of(), _Collectives.op, _Collectives.count, time.time()
        )

    def write(self) -> None:
        path = beat_path(self.folder, self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self.beat())))
        os.replace(tmp, path)

    def _run(self) -> None:
        last, written = None, 0.0
        while not self._stop.wait(PERIOD_S / 5):
            state = (self._step_of(), _Collectives.op, _Collectives.count)
            if state != last or time.monotonic() - written >= PERIOD_S:
                try:
                    self.write()
                except OSError:  # the run folder went away (a --fresh run beside us, a full disk): skip a beat
                    continue
                last, written = state, time.monotonic()


def read_beats(folder: Path, world_size: int) -> dict[int, Beat]:
    """The beats of ranks ``0..world_size-1`` found in ``folder`` (missing or unreadable ones are left out)."""
    beats = {}
    for rank in range(world_size):
        try:
            beats[rank] = Beat(**json.loads(beat_path(folder, rank).read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return beats
