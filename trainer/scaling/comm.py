"""Time of a collective from its bytes: who sends how much to whom, over which link.

An exchange (all-to-all, SparseAllGather, SparseReduceScatter) is a matrix bytes_DD[src, dst] over a group of
devices. Transfers inside a node use each GPU's own intra-node link; transfers between nodes share the node's
NICs. All links work at once, so the exchange takes as long as its busiest endpoint:

    max( max over devices of max(sent, received) inside the node / intra bandwidth,
         max over nodes of max(egress, ingress) / node NIC bandwidth )  + one latency per link kind used

An all-reduce is a ring (bus bandwidth model): every participant sends and receives 2 (n - 1) / n of the
buffer; when the ring spans nodes, each node's NICs carry that once per ring that crosses them.

Shapes: D devices of the group.
"""

from __future__ import annotations

import math

import numpy as np

from hecate.trainer.scaling.cluster import Cluster


def exchange_time(bytes_DD: np.ndarray, cluster: Cluster, first_device: int = 0) -> float:
    """Seconds for one exchange among devices ``first_device ... first_device + D - 1``."""
    bytes_DD = np.asarray(bytes_DD, dtype=np.float64).copy()
    np.fill_diagonal(bytes_DD, 0.0)  # a device's own rows never travel
    devices = bytes_DD.shape[0]
    node_D = (first_device + np.arange(devices)) // cluster.gpus_per_node
    same_DD = node_D[:, None] == node_D[None, :]
    intra_DD, inter_DD = np.where(same_DD, bytes_DD, 0.0), np.where(same_DD, 0.0, bytes_DD)
    intra = max(intra_DD.sum(1).max(), intra_DD.sum(0).max()) if devices else 0.0
    nodes = np.unique(node_D)
    egress = max((inter_DD[node_D == n].sum() for n in nodes), default=0.0)
    ingress = max((inter_DD[:, node_D == n].sum() for n in nodes), default=0.0)
    inter = max(egress, ingress)
    seconds = max(intra / cluster.intra.bytes_per_s, inter / cluster.inter.bytes_per_s)
    return seconds + (cluster.intra.latency_s if intra else 0.0) + (cluster.inter.latency_s if inter else 0.0)


def all_reduce_time(
    nbytes: float, participants: int, cluster: Cluster, spans_nodes: bool, rings_per_node: int = 1
) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` per participant; ``rings_per_node`` rings of this collective
    run at once through each node's NICs (e.g. one per GPU when each GPU's ring links it to other nodes)."""
    if participants <= 1 or nbytes <= 0:
        return 0.0
    per_participant = 2 * (participants - 1) / participants * nbytes
    link = cluster.inter if spans_nodes else cluster.intra
    load = per_participant * (rings_per_node if spans_nodes else 1)
    return load / link.bytes_per_s + 2 * math.ceil(math.log2(participants)) * link.latency_s
