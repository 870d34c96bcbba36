"""A timeline of one step as Chrome / Perfetto trace events: compute spans and each collective on its own track.

Open the JSON in https://ui.perfetto.dev or chrome://tracing. Each rank is a process (``pid`` = rank) and each
track a thread in it: ``compute`` for the spans the trainer marks (attention, experts, ...), and one track per
collective name (``moe.dispatch``, ``sparse_reduce_scatter``, ...) showing when each operation was in flight,
from its issue to the end of the ``wait`` that consumed it. Where a compute span and a collective span overlap
in time, the communication was hidden. Timestamps are ``time.monotonic_ns``, one clock for every process of a
machine, so the ranks of a simulated cluster line up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

COMPUTE = "compute"


def now_ns() -> int:
    return time.monotonic_ns()


class Timeline:
    """Collects spans while ``recording``; cheap to leave installed when it is not."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.recording = False
        self._lock = threading.Lock()
        self._spans: list[tuple[str, str, int, int]] = []  # (track, name, start ns, end ns)

    def add(self, track: str, name: str, start_ns: int, end_ns: int) -> None:
        if self.recording:
            with self._lock:
                self._spans.append((track, name, start_ns, end_ns))

    @contextmanager
    def span(self, name: str, track: str = COMPUTE) -> Iterator[None]:
        start = now_ns()
        try:
            yield
        finally:
            self.add(track, name, start, now_ns())

    def events(self) -> list[dict]:
        """Chrome trace events: complete spans ("X", microseconds) and the names of process and tracks."""
        with self._lock:
            spans = list(self._spans)
        tracks = [COMPUTE] + sorted({track for track, *_ in spans} - {COMPUTE})
        tid = {track: i for i, track in enumerate(tracks)}
        events = [{"ph": "M", "name": "process_name", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        events += [
            {"ph": "M", "name": "thread_name", "pid": self.rank, "tid": tid[t], "args": {"name": t}} for t in tracks
        ]
        events += [
            {
                "ph": "X",
                "name": name,
                "cat": track,
                "pid": self.rank,
                "tid": tid[track],
                "ts": start / 1e3,
                "dur": (end - start) / 1e3,
            }
            for track, name, start, end in spans
        ]
        return events

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}))
        return path


def merge_traces(paths: Sequence[Path], out: Path) -> Path:
    """One trace holding every rank's events (each rank wrote its own file)."""
    events = [e for p in paths for e in json.loads(Path(p).read_text())["traceEvents"]]
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out
