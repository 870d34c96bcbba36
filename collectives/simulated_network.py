"""A simulated network for the simulated cluster: ranks grouped into emulated nodes, links between nodes with a
bandwidth and a latency, enforced by delaying the completion of transfers - without burning CPU.

On one machine every transfer is a memory copy by the same cores that compute, so little communication can hide
behind computation and nothing resembles a cluster's inter-node link. :class:`SimulatedNetworkTransport` wraps a
real transport: each operation still moves its bytes (numerics are unchanged), and its handle's ``wait()`` then
sleeps until the modeled completion time. Sleeping threads leave the cores to the computation, as a NIC would.

The model, per rank and transport (a full-duplex NIC; operations on it serialized in issue order, as one NCCL
communicator or gloo process group runs its operations in order - a small message issued after a large one on the
same group waits for it; transports of different groups do not contend, which is optimistic):

    inter-node bytes  b = max(bytes sent to, bytes received from ranks on other nodes)  (per operation)
    start             = max(issue time, when this rank's NIC finished its previous transfer)
    done              = start + b / bandwidth + latency        (latency only when the group spans nodes)

Bytes per peer are exact for all-to-all and point-to-point; for all-reduce / all-gather / reduce-scatter /
broadcast the logical payload (``traffic.py``) is split evenly over the peers. Intra-node transfers run at the
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
            raise CollectiveError(f"--sim-nodes {self.nodes}: must be >= 1 and divide the {world_size} ranks "
                                  f"(ranks are grouped into nodes of equal size)")
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
    transport's rank r."""

    def __init__(self, inner: Transport, network: SimulatedNetwork | None, nodes: Sequence[int],
                 timeline: Timeline | None = None):
        if len(nodes) != inner.world_size:
            raise CollectiveError(f"nodes lists {len(nodes)} ranks for a {inner.world_size}-rank transport")
        self.inner, self.network, self.timeline = inner, network, timeline
        self.rank, self.world_size, self.stats = inner.rank, inner.world_size, inner.stats
        self.remote = [nodes[p] != nodes[inner.rank] for p in range(inner.world_size)]
        self._nic_free_s = 0.0
        self._lock = threading.Lock()

    # ---- the model -------------------------------------------------------------------------------

    def _done_at(self, issued_s: float, sent_by_peer: Sequence[int], received_by_peer: Sequence[int]) -> float:
        if self.network is None or not any(self.remote):
            return issued_s
        out = sum(b for b, far in zip(sent_by_peer, self.remote) if far)
        into = sum(b for b, far in zip(received_by_peer, self.remote) if far)
        with self._lock:
            start = max(issued_s, self._nic_free_s)
            self._nic_free_s = start + self.network.transfer_s(max(out, into))
            return self._nic_free_s + self.network.latency_us * 1e-6

    def _even(self, nbytes: int) -> list[int]:
        """A collective's payload split evenly over the other ranks."""
        peers = self.world_size - 1
        return [0 if p == self.rank or not peers else nbytes // peers for p in range(self.world_size)]

    def _delayed(self, name: str, inner: Handle, issued_s: float, issued_ns: int, done_s: float) -> Handle:
        """Block until the real operation is done and the modeled time has passed; the sleep counts as wait."""
        def block() -> None:
            remaining = done_s - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)

        def finish():
            result = inner.wait()
            if self.timeline is not None:
                self.timeline.add(name, name, issued_ns, now_ns())
            return result

        return Handle(block, finish, lambda seconds: self.stats.record_wait(name, seconds))

    # ---- the protocol ----------------------------------------------------------------------------

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                   input_splits: Sequence[int], *, name: str = "all_to_all") -> Handle[torch.Tensor]:
        issued_s, issued_ns = time.monotonic(), now_ns()
        handle = self.inner.all_to_all(output, input, output_splits, input_splits, name=name)
        sent = [s * traffic.row_bytes(input) for s in input_splits]
        received = [s * traffic.row_bytes(output) for s in output_splits]
        return self._delayed(name, handle, issued_s, issued_ns, self._done_at(issued_s, sent, received))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *,
                   name: str = "all_gather") -> Handle[torch.Tensor]:
        return self._collective(name, traffic.all_gather(input, self.world_size),
                                lambda: self.inner.all_gather(output, input, name=name))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, *,
                       name: str = "reduce_scatter") -> Handle[torch.Tensor]:
        return self._collective(name, traffic.reduce_scatter(output, input, self.world_size),
                                lambda: self.inner.reduce_scatter(output, input, name=name))

    def all_reduce(self, tensor: torch.Tensor, *, reduce: Reduction = "sum",
                   name: str = "all_reduce") -> Handle[torch.Tensor]:
        return self._collective(name, traffic.all_reduce(tensor, self.world_size),
                                lambda: self.inner.all_reduce(tensor, reduce=reduce, name=name))

    def broadcast(self, tensor: torch.Tensor, src: int, *, name: str = "broadcast") -> Handle[torch.Tensor]:
        return self._collective(name, traffic.broadcast(tensor, src, self.rank, self.world_size),
                                lambda: self.inner.broadcast(tensor, src, name=name))

    def batch_p2p(self, ops: Sequence[PeerOp], *, name: str = "p2p") -> Handle[None]:
        issued_s, issued_ns = time.monotonic(), now_ns()
        handle = self.inner.batch_p2p(ops, name=name)
        sent, received = [0] * self.world_size, [0] * self.world_size
        for op in ops:
            (sent if op.kind == "send" else received)[op.peer] += op.tensor.nbytes
        return self._delayed(name, handle, issued_s, issued_ns, self._done_at(issued_s, sent, received))

    def barrier(self, *, name: str = "barrier") -> Handle[None]:
        return self._collective(name, (0, 0), lambda: self.inner.barrier(name=name))

    def _collective(self, name: str, sent_received: tuple[int, int], issue) -> Handle:
        issued_s, issued_ns = time.monotonic(), now_ns()
        handle = issue()
        sent, received = sent_received
        return self._delayed(name, handle, issued_s, issued_ns,
                             self._done_at(issued_s, self._even(sent), self._even(received)))
