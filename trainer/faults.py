"""Fault injection, for testing how a job fails: ``HECATE_FAULT=KIND@RANK:STEP`` makes rank RANK, at the start of
optimizer step STEP (counted from 1), raise (``raise``), die by SIGKILL (``kill``) or stop answering (``hang``);
``KIND@RANK:saveSTEP`` does it in the middle of saving the checkpoint of step STEP.
Read from the environment so that every launcher passes it the same way; absent in normal runs. Only a job's
first attempt is hit (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a restarted job can get past it."""

from __future__ import annotations

import os
import signal
import time

ENV = "HECATE_FAULT"
KINDS = ("raise", "kill", "hang")
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun (and the Ray launcher) on a restarted attempt


class InjectedFault(RuntimeError):
    pass


def maybe_inject(rank: int, step: int, during: str = "") -> None:
    """Called at the start of each step (``during=""``) and in each checkpoint save (``during="save"``)."""
    spec = os.environ.get(ENV)
    if not spec or os.environ.get(RESTART_ENV, "0") != "0":
        return
    kind, _, where = spec.partition("@")
    fault_rank, _, fault_at = where.partition(":")
    fault_during = "save" if fault_at.startswith("save") else ""
    fault_step = fault_at.removeprefix("save")
    if kind not in KINDS or not fault_rank.isdigit() or not fault_step.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected KIND@RANK:STEP or KIND@RANK:saveSTEP with KIND one of {KINDS}")
    if (rank, step, during) != (int(fault_rank), int(fault_step), fault_during):
        return
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {rank} {'saving' if during else 'at'} step {step} ({ENV}={spec})")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)
