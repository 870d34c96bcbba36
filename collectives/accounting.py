"""Traffic accounting: bytes sent and received and time spent waiting, per operation name.

Every transport records into a :class:`CommStats`; the trainer's metrics and the benchmarks read
:meth:`CommStats.snapshot`. Bytes are the operation's logical payload between this rank and the others
(what its semantics require to cross, independent of the algorithm the library picks; see ``traffic.py``),
so that numbers compare across transports. Wait time is the time a caller spent blocked in ``Handle.wait``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from hecate.collectives import heartbeat


@dataclass(frozen=True)
class OpStats:
    """Totals of one operation name on one rank."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0

    def __sub__(self, earlier: OpStats) -> OpStats:
        return OpStats(
            self.calls - earlier.calls,
            self.bytes_sent - earlier.bytes_sent,
            self.bytes_received - earlier.bytes_received,
            self.wait_s - earlier.wait_s,
        )


class CommStats:
    """Thread-safe totals per operation name; several transports may share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, OpStats] = {}

    def record(self, name: str, sent: int, received: int) -> None:
        """Count one call of ``name`` moving ``sent`` bytes out of and ``received`` bytes into this rank."""
        heartbeat.note(name)
        with self._lock:
            old = self._ops.get(name, OpStats())
            self._ops[name] = replace(
                old,
                calls=old.calls + 1,
                bytes_sent=old.bytes_sent + sent,
                bytes_received=old.bytes_received + received,
            )

    def record_wait(self, name: str, seconds: float) -> None:
        with self._lock:
            old = self._ops.get(name, OpStats())
            self._ops[name] = replace(old, wait_s=old.wait_s + seconds)

    def snapshot(self) -> dict[str, OpStats]:
        """A copy of the totals so far; subtract two snapshots (``after[name] - before[name]``) for an interval."""
        with self._lock:
            return dict(self._ops)

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()


def delta(after: dict[str, OpStats], before: dict[str, OpStats]) -> dict[str, OpStats]:
    """Per-name difference of two snapshots (names absent before count from zero)."""
    return {name: stats - before.get(name, OpStats()) for name, stats in after.items()}
