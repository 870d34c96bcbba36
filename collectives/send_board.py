"""Where the ranks of one simulated-network transport post when each of their sends finishes, so that a receiver's
modeled transfer ends no earlier than its senders': data cannot arrive before it has been sent.

A rank that issues an exchange early must still wait for the rank that issues it late, plus that rank's transfer.
Without the board each rank could only model its own NIC from its own issue time, and the link's time would run
concurrently with the wait for the late rank, as no real link does.

Every rank of the simulated cluster runs on this machine, so ``time.monotonic()`` (CLOCK_MONOTONIC) is one clock
for all of them, and a file in /dev/shm is memory they all map. The board is a ring of slots per ordered pair
(sender, receiver); a slot holds the pair's operation number + 1 and the time the sender's transfer ends. Both
ends count the operations between them in issue order, which a group's collectives share on every rank.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time

import numpy as np
import torch

from hecate.collectives.errors import CollectiveError
from hecate.collectives.transport import Transport

SLOTS = 256  # operations a sender may issue ahead of a receiver's wait, per pair (a step has dozens)
PATH_BYTES = 256
POLL_S = 50e-6
TIMEOUT_S = 600.0


class SendBoard:
    """Shared send-finish times of the ranks of ``transport``'s group. Built collectively: every rank of the group
    constructs it at the same point (rank 0 creates the memory and broadcasts its path)."""

    def __init__(self, transport: Transport):
        self.rank, world = transport.rank, transport.world_size
        size = world * world * SLOTS * 2 * 8
        path_bytes = torch.zeros(PATH_BYTES, dtype=torch.uint8)
        if self.rank == 0:
            fd, path = tempfile.mkstemp(prefix="hecate-simnet-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, size)
            os.close(fd)
            path_bytes[: len(path)] = torch.tensor(list(path.encode()), dtype=torch.uint8)
        transport.broadcast(path_bytes, 0, name="simnet.board").wait()
        path = bytes(path_bytes.tolist()).rstrip(b"\0").decode()
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise CollectiveError(
                f"the simulated network needs every rank on one machine: rank {self.rank} cannot "
                f"open rank 0's board {path}"
            ) from e
        try:
            self._memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = np.frombuffer(self._memory, dtype=np.float64).reshape(world, world, SLOTS, 2)
        transport.barrier(name="simnet.board").wait()
        if self.rank == 0:
            os.unlink(path)  # every rank has mapped it; the memory lives until the last one exits

    def post(self, receiver: int, op: int, sent_s: float) -> None:
        """This rank's ``op``-th transfer to ``receiver`` ends at ``sent_s`` (monotonic seconds)."""
        slot = self._slots[self.rank, receiver, op % SLOTS]
        slot[1] = sent_s
        slot[0] = op + 1  # written last: a reader that sees the number sees the time

    def read(self, sender: int, op: int) -> float:
        """When ``sender``'s ``op``-th transfer to this rank ends; waits (sleeping) until the sender has posted it."""
        slot = self._slots[sender, self.rank, op % SLOTS]
        deadline = time.monotonic() + TIMEOUT_S
        while slot[0] != op + 1:
            if slot[0] > op + 1:
                raise CollectiveError(
                    f"simulated network: rank {sender} ran more than {SLOTS} operations ahead of "
                    f"rank {self.rank}'s wait for their operation {op}"
                )
            if time.monotonic() > deadline:
                raise CollectiveError(
                    f"simulated network: rank {sender} did not issue its operation {op} to rank "
                    f"{self.rank} within {TIMEOUT_S:.0f} s"
                )
            time.sleep(POLL_S)
        return float(slot[1])
