"""Hang diagnostics: when a collective gives up (``train.collective_timeout_s`` passed, or a peer vanished), say
what this rank was waiting in - the operation, the step, the layer, the peer ranks and the line of Hecate code
that called it - so that a hung job exits non-zero with the reason on every rank instead of waiting forever.

Everything is read from the exception's traceback: the frame in ``torch.distributed`` names the operation and
holds its ``group`` (the peers); the first frame whose ``self`` is a module of the model names the layer.
Which peers never arrived, and where they were last seen, comes from their heartbeats
(:mod:`hecate.collectives.heartbeat`): a rank that stopped running has a stale one, a rank stuck outside the
collectives has issued fewer of them than the others.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from types import FrameType, TracebackType

import torch.distributed as dist
from torch import nn

from hecate.collectives.errors import HecateError
from hecate.collectives.heartbeat import STALE_S, Beat, read_beats

TORCH_DISTRIBUTED = os.path.dirname(dist.__file__)
HECATE_ROOMS = tuple(os.sep + room + os.sep for room in ("collectives", "parallel", "trainer", "launch"))
# what gloo (and the store) say when a peer does not answer in time or is gone
COLLECTIVE_FAILURES = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer")


class CollectiveTimeout(HecateError):
    """A collective did not complete on this rank; the message names what it was waiting in."""


def waiting_in(err: BaseException, model: nn.Module | None = None) -> str | None:
    """``"all_to_all_single over ranks [0, 1] (layer blocks.1.moe; called from parallel/moe/ep_dispatcher.py:88
    in dispatch)"`` when ``err`` came out of a collective that timed out or lost a peer, else ``None``."""
    if not isinstance(err, RuntimeError) or not any(s in str(err) for s in COLLECTIVE_FAILURES):
        return None
    frames = _frames(err.__traceback__)
    c10d = [
        f
        for f in frames
        if f.f_code.co_filename.startswith(TORCH_DISTRIBUTED) and f.f_code.co_name not in ("wrapper", "_fn")
    ]
    ours = [f for f in frames if any(room in f.f_code.co_filename for room in HECATE_ROOMS)]
    # a blocking call names itself (the c10d frame); an async one is waited on through a Handle, whose
    # on_wait callback carries the name the transport recorded it under (e.g. "moe.router_counts")
    op = c10d[-1].f_code.co_name if c10d else _handle_name(ours) or "an asynchronous collective"
    peers = _peers(list(reversed(c10d + ours)))
    callers = [f for f in ours if os.sep + "collectives" + os.sep not in f.f_code.co_filename]
    details = [f"layer {layer}" for layer in [_layer(ours, model)] if layer]
    if callers:
        caller = callers[-1]
        details.append(f"called from {_short(caller.f_code.co_filename)}:{caller.f_lineno} in {caller.f_code.co_name}")
    return op + (f" over ranks {peers}" if peers else "") + (f" ({'; '.join(details)})" if details else "")


def _handle_name(frames: list[FrameType]) -> str | None:
    for frame in reversed(frames):
        on_wait = getattr(frame.f_locals.get("self"), "_on_wait", None)
        if isinstance(on_wait, functools.partial) and on_wait.args and isinstance(on_wait.args[0], str):
            return on_wait.args[0]
    return None


def _peers(frames: list[FrameType]) -> list[int] | None:
    """Global ranks of the first process group found in the frames (a ``group`` argument, or an object such as a
    transport that holds one), innermost first."""
    for frame in frames:
        for value in frame.f_locals.values():
            group = value if isinstance(value, dist.ProcessGroup) else getattr(value, "group", None)
            if isinstance(group, dist.ProcessGroup):
                try:
                    return dist.get_process_group_ranks(group)
                except (RuntimeError, ValueError):
                    return None
    return None


def _frames(tb: TracebackType | None) -> list[FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _layer(frames: list[FrameType], model: nn.Module | None) -> str | None:
    if model is None:
        return None
    names = {id(module): name for name, module in model.named_modules() if name}
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            return names[id(owner)]
    return None


def _short(path: str) -> str:
    for room in HECATE_ROOMS:
        if room in path:
            return room.strip(os.sep) + "/" + path.split(room, 1)[1]
    return path


def never_arrived(folder: Path, world_size: int, me: int, attempt: int) -> str | None:
    """``"rank 2 stopped answering [pid 41, last seen in step 5 at moe.router_sums, collective #180, 16 s ago]"``
    for the peers that kept the job waiting, from their heartbeats in ``folder``; None when every peer looks fine
    (then the waiting itself, or a dead peer the launcher names, is the story)."""
    now = time.time()
    beats = {r: b for r, b in read_beats(folder, world_size).items() if b.attempt == attempt}
    parts = [f"rank {r} never started (no heartbeat)" for r in range(world_size) if r not in beats]
    peers = {r: b for r, b in beats.items() if r != me}
    stale = {r: b for r, b in peers.items() if b.age_s(now) > STALE_S}
    parts += [f"rank {r} stopped answering [{_seen(b, now)}]" for r, b in sorted(stale.items())]
    live = {r: b for r, b in beats.items() if r not in stale}
    most = max((b.ops for b in live.values()), default=0)
    parts += [
        f"rank {r} is behind [{_seen(b, now)}; others issued up to #{most}]"
        for r, b in sorted(live.items())
        if r != me and b.ops < most and not stale
    ]
    return "; ".join(parts) or None


def _seen(beat: Beat, now: float) -> str:
    where = f"at {beat.op}, collective #{beat.ops}" if beat.op else "before its first collective"
    return f"pid {beat.pid}, last seen in step {beat.step} {where}, {beat.age_s(now):.0f} s ago"
