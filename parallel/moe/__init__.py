"""The Mixture-of-Experts layer: router, experts, dispatch.

One idea a file: ``router`` (scores, top-k, expert bias), ``losses`` (aux and z-loss from reducible sums),
``capacity`` (token-major dropping), ``permute`` (sort pairs by expert and back), ``dispatcher`` (the EP seam),
``ffn`` (the FFN math and the dense FeedForward), ``experts`` (batched expert compute), ``routes``
(who sends which rows where, per overlap chunk), ``ep_dispatcher`` (expert parallelism), ``layer`` (the MoE module).
"""

from hecate.parallel.moe.dispatcher import Dispatcher, LocalDispatcher
from hecate.parallel.moe.experts import Experts, ExpertWeights
from hecate.parallel.moe.ffn import FeedForward, ffn
from hecate.parallel.moe.layer import MoE, MoEStats
from hecate.parallel.moe.losses import RouterSums, aux_loss, local_reduce, router_sums, z_loss
from hecate.parallel.moe.router import Router, Routing, route

__all__ = [
    "Dispatcher",
    "ExpertWeights",
    "Experts",
    "FeedForward",
    "LocalDispatcher",
    "MoE",
    "MoEStats",
    "Router",
    "RouterSums",
    "Routing",
    "aux_loss",
    "ffn",
    "local_reduce",
    "route",
    "router_sums",
    "z_loss",
]
