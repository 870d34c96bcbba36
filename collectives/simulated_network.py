"""A simulated network for the simulated cluster: ranks grouped into emulated nodes, links between nodes with a
bandwidth and a latency, enforced by delaying the completion of transfers - without burning CPU.

On one machine every transfer is a memory copy by the same cores that compute, so little communication can hide
behind computation and nothing resembles a cluster's inter-node link. :class:`SimulatedNetworkTransport` wraps a
real transport: each operation still moves its bytes (numerics are unchanged), and its handle's ``wait()`` then
sleeps until the modeled completion time. Sleeping threads leave the cores to the computation, as a NIC would.

The model, per rank and transport (a full-duplex NIC; operations on it serialized in issue order, as one NCCL
communicator or gloo process group runs its operations in order - a small message issued after a large one on the
same group waits for it; transports of different groups do not contend, which is optimistic):

    out, into   bytes this rank sends to / receives from ranks on other nodes  (per operation)
    start       = max(issue time, when this rank's NIC finished its previous transfer)
    sent        = start + out / bandwidth                    posted for the receivers (send_board.py)
    done        = max(start + max(out, into) / bandwidth,    this rank's NIC
                      sent of every remote rank sending to this one) + latency

A late sender therefore delays its receivers by its whole transfer, as on a real link. Latency counts only when
the group spans nodes.

Bytes per peer are exact for all-to-all, point-to-point and broadcast; for all-reduce / all-gather /
reduce-scatter / barrier the logical payload (``traffic.py``) is split evenly over the peers, and every rank
waits for every remote one. Intra-node transfers run at the
machine's real speed. The same wrapper records each operation's issue-to-wait span on a :class:`Timeline`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hecate.collectives import traffic
from hecate.collectives.errors import CollectiveError
from hecate.collectives.handle import Handle
from hecate.collectives.send_board import SendBoard
from hecate.collectives.timeline import Timeline, now_ns
from hecate.collectives.transport import PeerOp, Reduction, Transport


@dataclass(frozen=True)
class SimulatedNetwork:
    """``nodes`` emulated nodes of consecutive global ranks; links between nodes at ``inter_node_gbps`` gigabits
    per second with ``latency_us`` one-way latency."""

    nodes: int
    inter_node_gbps: float
    latency_us: float = 0.0

    def validate(self, world_size: int) -> None:
        """Raises CollectiveError naming the option (``--sim-nodes`` ...) when the settings cannot apply."""
        if self.nodes < 1 or world_size % self.nodes:
            raise CollectiveError(
                f"--sim-nodes {self.nodes}: must be >= 1 and divide the {world_size} ranks "
                f"(ranks are grouped into nodes of equal size)"
            )
        if not self.inter_node_gbps > 0:
            raise CollectiveError(f"--sim-inter-node-gbps {self.inter_node_gbps}: must be > 0")
        if self.latency_us < 0:
            raise CollectiveError(f"--sim-latency-us {self.latency_us}: must be >= 0")

    def node_of(self, global_rank: int, world_size: int) -> int:
        return global_rank // (world_size // self.nodes)

    def transfer_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.inter_node_gbps * 1e9)


class SimulatedNetworkTransport:
    """``inner`` with inter-node transfers delayed per :class:`SimulatedNetwork` (``network=None``: no delay) and
    every operation's flight recorded on ``timeline`` when given. ``nodes[r]`` is the emulated node of the
    transport's rank r. With a network between nodes, every rank of the group constructs it at the same point
    (the ranks share a :class:`SendBoard`)."""

    def __init__(
        self, inner: Transport, network: SimulatedNetwork | None, nodes: Sequence[int], timeline: Timeline | None = None
    ):
        if len(nodes) != inner.world_size:
            raise CollectiveError(f"nodes lists {len(nodes)} ranks for a {inner.world_size}-rank transport")
        self.inner, self.network, self.timeline = inner, network, timeline
        self.rank, self.world_size, self.stats = inner.rank, inner.world_size, inner.stats
        self.remote = [nodes[p] != nodes[inner.rank] for p in range(inner.world_size)]
        self._board = SendBoard(inner) if network is not None and any(self.remote) else None
        self._sent_ops = [0] * self.world_size  # operations this rank has issued with a transfer to each peer
        self._received_ops = [0] * self.world_size  # and with a transfer from each peer
        self._nic_free_s = 0.0
        self._lock = threading.Lock()

    # ---- the model -------------------------------------------------------------------------------

    def _model(
        self, issued_s: float, sent_by_peer: Sequence[int], received_by_peer: Sequence[int], every_peer: bool
    ) -> tuple[float, list[tuple[int, int]]]:
        """This rank's NIC completion, and the (sender, operation number) pairs to read from the board at wait;
        posts this rank's send completion for its receivers. ``every_peer``: every remote rank counts as sender
        and receiver (collectives whose completion needs every rank)."""
        if self._board is None:
            return issued_s, []
        receivers = [p for p, far in enumerate(self.remote) if far and (every_peer or sent_by_peer[p])]
        senders = [p for p, far in enumerate(self.remote) if far and (every_peer or received_by_peer[p])]
        out = sum(sent_by_peer[p] for p, far in enumerate(self.remote) if far)
        into = sum(received_by_peer[p] for p, far in enumerate(self.remote) if far)
        with self._lock:
            start = max(issued_s, self._nic_free_s)
            self._nic_free_s = start + self.network.transfer_s(max(out, into))
            sent_s = start + self.network.transfer_s(out)
            for p in receivers:
                self._board.post(p, self._sent_ops[p], sent_s)
                self._sent_ops[p] += 1
            reads = [(p, self._received_ops[p]) for p in senders]
            for p in senders:
                self._received_ops[p] += 1
            return self._nic_free_s, reads

    def _even(self, nbytes: int) -> list[int]:
        """A collective's payload split evenly over the other ranks."""
        peers = self.world_size - 1
        return [0 if p == self.rank or not peers else nbytes // peers for p in range(self.world_size)]

    def _issue(
        self, name: str, sent_by_peer: Sequence[int], received_by_peer: Sequence[int], issue, every_peer: bool = False
    ) -> Handle:
        """Post this operation's transfer and issue it; ``wait()`` waits for the real operation, then sleeps until
        the modeled completion (both count as wait, sleeping leaves the cores to the computation)."""
        issued_s, issued_ns = time.monotonic(), now_ns()
        nic_done_s, reads = self._model(issued_s, sent_by_peer, received_by_peer, every_peer)

        def arrive(result):
            if self._board is not None:
                blocked_from = time.monotonic()
                arrived_s = max([nic_done_s] + [self._board.read(p, op) for p, op in reads])
                remaining = arrived_s + self.network.latency_us * 1e-6 - time.monotonic()
                if remaining > 0:
                    time.sleep(remaining)
                self.stats.record_wait(name, time.monotonic() - blocked_from)
            if self.timeline is not None:
                self.timeline.add(name, name, issued_ns, now_ns())
            return result

        return issue().then(arrive)  # the inner operation's own wait is recorded by the inner transport

    # ---- the protocol ----------------------------------------------------------------------------

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: Sequence[int],
        input_splits: Sequence[int],
        *,
        name: str = "all_to_all",
    ) -> Handle[torch.Tensor]:
        sent = [s * traffic.row_bytes(input) for s in input_splits]
        received = [s * traffic.row_bytes(output) for s in output_splits]
        return self._issue(
            name, sent, received, lambda: self.inner.all_to_all(output, input, output_splits, input_splits, name=name)
        )

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "all_gather"
    ) -> Handle[torch.Tensor]:
        return self._collective(
            name, traffic.all_gather(input, self.world_size), lambda: self.inner.all_gather(output, input, name=name)
        )

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, name: str = "reduce_scatter"
    ) -> Handle[torch.Tensor]:
        return self._collective(
            name,
            traffic.reduce_scatter(output, input, self.world_size),
            lambda: self.inner.reduce_scatter(output, input, name=name),
        )

    def all_reduce(
        self, tensor: torch.Tensor, *, reduce: Reduction = "sum", name: str = "all_reduce"
    ) -> Handle[torch.Tensor]:
        return self._collective(
            name,
            traffic.all_reduce(tensor, self.world_size),
            lambda: self.inner.all_reduce(tensor, reduce=reduce, name=name),
        )

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]:
        """Only the source sends: every other rank waits for the source alone."""
        sent = [tensor.nbytes if self.rank == src and p != src else 0 for p in range(self.world_size)]
        received = [tensor.nbytes if p == src != self.rank else 0 for p in range(self.world_size)]
        return self._issue(name, sent, received, lambda: self.inner.broadcast(tensor, src, name=name))

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]:
        sent, received = [0] * self.world_size, [0] * self.world_size
        for op in ops:
            (sent if op.kind == "send" else received)[op.peer] += op.tensor.nbytes
        return self._issue(name, sent, received, lambda: self.inner.batch_p2p(ops, name=name))

    def barrier(self, *, name: str = "barrier") -> Handle[None]:
        return self._collective(name, (0, 0), lambda: self.inner.barrier(name=name))

    def _collective(self, name: str, sent_received: tuple[int, int], issue) -> Handle:
        sent, received = sent_received
        return self._issue(name, self._even(sent), self._even(received), issue, every_peer=True)
