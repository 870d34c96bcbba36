"""The expert-holding seam on 2 real processes: every way of holding experts gives back the whole tensors it was
given, and an FSSDP ownership move carries the whole per-expert optimizer state, whatever the optimizer keeps."""

import pytest
import torch

from hecate.launch.simulate import run_workers

pytestmark = pytest.mark.slow


def _layer():
    from hecate.parallel.config import MoEConfig
    from hecate.parallel.moe import MoE

    torch.manual_seed(0)
    return torch.nn.Sequential(MoE(8, MoEConfig(num_experts=4, top_k=2, ffn_dim=16, activation="swiglu")))


def round_trips() -> dict[str, bool]:
    """full(local(x)) == x and from_saved(to_saved(.)) == identity, for each expert sharding."""
    import torch.distributed as dist

    from hecate.collectives import CommStats, TorchTransport
    from hecate.parallel.config import FssdpConfig
    from hecate.parallel.expert_sharding import ExpertParallel, FullySharded, Replicated
    from hecate.parallel.topology import ParallelDims, build_meshes

    transport = TorchTransport(None, CommStats())
    dims = ParallelDims(world=2, dp=2, tp=1, pp=1, ep=2, etp=1)
    mesh = build_meshes(dims).moe["edp", "ep"]
    out = {}
    for name, sharding in {
        "replicated": Replicated(None, 2),
        "ep": ExpertParallel(transport, None, 1, mesh=mesh),
        "fssdp": FullySharded(transport, FssdpConfig(policy="ep")),
    }.items():
        model = _layer()
        whole_E = model[0].experts.w1.detach().clone()
        sharding.wrap(model)
        local = model[0].experts.w1.detach()
        full = sharding.full("0.experts.w1", local)
        back = sharding.from_saved("0.experts.w1", sharding.to_saved("0.experts.w1", local))
        out[name] = (
            torch.equal(full, whole_E)
            and torch.equal(sharding.local("0.experts.w1", whole_E), local)
            and torch.equal(back, local)
            and local.shape[0] == (4 if name == "replicated" else 2)
        )
    dist.barrier()
    return out


def move_keeps_optimizer_state(optimizer_name: str) -> bool:
    """Train a step, record every expert's weights and optimizer state whole, move ownership, compare."""
    from hecate.collectives import CommStats, OwnerPlacement, TorchTransport
    from hecate.parallel.config import FssdpConfig
    from hecate.parallel.data_parallel import router_sums_reduce
    from hecate.parallel.expert_sharding import FullySharded

    transport = TorchTransport(None, CommStats())
    model = _layer()
    model[0].reduce = router_sums_reduce(transport)
    sharding = FullySharded(transport, FssdpConfig(policy="fssdp", min_imbalance=1.0))
    sharding.wrap(model)
    params = list(model[0].experts.parameters())
    optimizer = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer_name == "sgd" else torch.optim.AdamW(params, lr=0.1)
    )
    torch.manual_seed(1 + transport.rank)
    model(torch.randn(2, 8, 8)).square().mean().backward()
    optimizer.step()
    (fl,) = sharding.engine.layers.values()

    def whole() -> list[torch.Tensor]:
        names = ["0.experts.w1", "0.experts.w2", "0.experts.w3"]
        tensors = []
        for name, p in zip(names, model[0].experts.weights()):
            tensors.append(sharding.full(name, p.detach()))
            tensors += [sharding.full(name, v) for v in optimizer.state[p].values() if v.shape == p.shape]
        return tensors

    before = whole()
    fl.move_ownership(OwnerPlacement((1, 0, 1, 0), 2), optimizer)
    after = whole()
    per_weight = {"sgd": 2, "adamw": 3}[optimizer_name]  # the weight, then momentum_buffer / exp_avg, exp_avg_sq
    return (
        fl.owner.owner_C == (1, 0, 1, 0)
        and len(before) == 3 * per_weight
        and all(torch.equal(a, b) for a, b in zip(before, after))
    )


def test_every_expert_sharding_round_trips_whole_tensors():
    for result in run_workers(round_trips, 2, timeout_s=120):
        assert result == {"replicated": True, "ep": True, "fssdp": True}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ownership_move_carries_the_whole_per_expert_optimizer_state(optimizer):
    assert run_workers(move_keeps_optimizer_state, 2, optimizer, timeout_s=120) == [True, True]
