"""Raising the same error on every rank: a problem only one rank can see must not leave the others hanging."""

from __future__ import annotations

import torch

from hecate.collectives.errors import CollectiveError
from hecate.collectives.transport import Transport


def raise_unless_all_agree(
    transport: Transport, name: str, problem: str | None, fingerprint: int, device: torch.device
) -> None:
    """One tiny max-all-reduce before data moves: slot r holds rank r's problem flag, then the plan fingerprint
    and its negation (so max and min arrive together). Every rank then raises if any rank found a problem with
    its local inputs or the ranks compiled different plans. (An all-reduce: gloo's all-gather is far slower.)"""
    world_size = transport.world_size
    votes = torch.zeros(world_size + 2, dtype=torch.int64, device=device)
    votes[transport.rank] = int(problem is not None)
    votes[world_size:] = torch.tensor([fingerprint, -fingerprint], device=device)
    transport.all_reduce(votes, reduce="max", name=f"{name}.check").wait()
    votes = votes.tolist()
    bad_ranks = [rank for rank in range(world_size) if votes[rank]]
    if bad_ranks:
        detail = problem if problem is not None else "see the error on those ranks"
        raise CollectiveError(
            f"{name}: rank(s) {bad_ranks} passed local chunks that do not match the placement and chunk specs; "
            f"nothing was moved. {detail}"
        )
    highest, lowest = votes[world_size], -votes[world_size + 1]
    if highest != lowest:
        raise CollectiveError(
            f"{name}: ranks compiled different plans (placements or chunk specs differ between ranks; plan "
            f"fingerprints range from {lowest} to {highest}, this rank's is {fingerprint}); nothing was moved"
        )
