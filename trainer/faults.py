"""Fault injection, for testing how a job fails: ``HECATE_FAULT=KIND@RANK:STEP`` makes rank RANK, at the start of
optimizer step STEP (counted from 1), raise (``raise``), die by SIGKILL (``kill``) or stop answering (``hang``).
Read from the environment so that every launcher passes it the same way; absent in normal runs."""
from __future__ import annotations

import os
import signal
import time

ENV = "HECATE_FAULT"
KINDS = ("raise", "kill", "hang")


class InjectedFault(RuntimeError):
    pass


def maybe_inject(rank: int, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, _, where = spec.partition("@")
    fault_rank, _, fault_step = where.partition(":")
    if kind not in KINDS or not fault_rank.isdigit() or not fault_step.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected KIND@RANK:STEP with KIND one of {KINDS}")
    if (rank, step) != (int(fault_rank), int(fault_step)):
        return
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {rank} at step {step} ({ENV}={spec})")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)
