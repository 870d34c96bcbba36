"""The MoE layer against a naive reference written here (a loop over tokens and their chosen experts), its
gradients, the data-parallel seam (router sums reduced by hand over two halves of a batch), sub-batches begun
apart and finished together (``moe.overlap_sub_batches``), and bf16 autocast.

Shapes: T tokens, D model dim, E experts, K experts per token.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hecate.parallel.config import MoEConfig
from hecate.parallel.moe import ExpertWeights, MoE, RouterSums

DIM, HIDDEN, E, K = 16, 24, 4, 2
B, S = 2, 8  # T = 16 tokens, 32 pairs, 8 per expert on average
INIT_STD = 0.3  # logits spread well apart, so that the naive sort and torch.topk never face a near-tie
FP32_TOL = dict(atol=2e-5, rtol=1e-4)  # same math, different summation order
BF16_REL_ERR = 0.05  # bf16 has 8 bits of mantissa; the router stays in fp32 so the choices do not change


def make_moe(seed: int = 0, **overrides) -> MoE:
    cfg = MoEConfig(num_experts=E, top_k=K, ffn_dim=HIDDEN, **overrides)
    cfg.validate()
    torch.manual_seed(seed)
    moe = MoE(DIM, cfg, init_std=INIT_STD)
    moe.router.expert_bias.copy_(torch.tensor([0.05, -0.1, 0.0, 0.08]))  # selection-only; exercised everywhere
    return moe


def naive_expert(x_D, w1, w2, w3, activation):
    h = x_D @ w1
    h = F.silu(h) * (x_D @ w3) if activation == "swiglu" else F.gelu(h)
    return h @ w2


def naive_moe(moe: MoE, x_TD: torch.Tensor):
    """Per-token loop. Returns out_TD, aux loss, z-loss, counts before dropping, dropped pairs."""
    cfg, ex = moe.cfg, moe.experts
    logits = x_TD @ moe.router.gate.weight.t()
    scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
    probs = scores / scores.sum(-1, keepdim=True)
    T = x_TD.shape[0]
    capacity = math.ceil(cfg.capacity_factor * T * K / E) if cfg.capacity_factor else math.inf
    counts, placed, dropped, rows = [0] * E, [0] * E, 0, []
    for t in range(T):
        select = (scores[t] + moe.router.expert_bias).tolist()
        chosen = sorted(range(E), key=lambda e: -select[e])[:K]
        w = scores[t, chosen]
        if cfg.renormalize:
            w = w / w.sum()
        y = torch.zeros(DIM)
        for j, e in enumerate(chosen):
            counts[e] += 1
            if placed[e] < capacity:
                placed[e] += 1
                w3 = ex.w3[e] if ex.w3 is not None else None
                y = y + w[j] * naive_expert(x_TD[t], ex.w1[e], ex.w2[e], w3, cfg.activation)
            else:
                dropped += 1
        if moe.shared is not None:
            # each shared expert on its own (the layer holds them as one FFN of their hidden sizes together)
            k, sh = cfg.shared_experts, moe.shared
            w3s = sh.w3.chunk(k, dim=1) if sh.w3 is not None else [None] * k
            shared = sum(
                naive_expert(x_TD[t], w1, w2, w3, cfg.activation)
                for w1, w2, w3 in zip(sh.w1.chunk(k, dim=1), sh.w2.chunk(k, dim=0), w3s)
            )
            if moe.shared_gate is not None:
                shared = torch.sigmoid(x_TD[t] @ moe.shared_gate.weight[0]) * shared
            y = y + shared
        rows.append(y)
    aux = E * sum(counts[e] / (T * K) * probs[:, e].mean() for e in range(E))
    z = torch.logsumexp(logits, -1).square().mean()
    return torch.stack(rows), aux, z, counts, dropped


def grads(moe: MoE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in moe.named_parameters()}


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75], ids=["dropless", "capacity"])
@pytest.mark.parametrize("shared_expert", [0, 1, 2, "gated"], ids=["routed", "shared", "two-shared", "gated"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_matches_naive_reference(activation, score, shared_expert, capacity_factor):
    shared = dict(shared_experts=2, shared_ffn_dim=5, shared_gate=True) if shared_expert == "gated" else {}
    moe = make_moe(
        activation=activation,
        score=score,
        capacity_factor=capacity_factor,
        **(shared or dict(shared_experts=shared_expert)),
    )
    x_BSD = torch.randn(B, S, DIM)
    upstream = torch.randn(B, S, DIM)

    out = moe(x_BSD)
    stats = moe.stats
    got = grads(moe, (out * upstream).sum() + stats.aux_loss + stats.z_loss)

    ref_out, ref_aux, ref_z, ref_counts, ref_dropped = naive_moe(moe, x_BSD.view(-1, DIM))
    want = grads(moe, (ref_out.view_as(out) * upstream).sum() + ref_aux + ref_z)

    torch.testing.assert_close(out, ref_out.view_as(out), **FP32_TOL)
    torch.testing.assert_close(stats.aux_loss, ref_aux, **FP32_TOL)
    torch.testing.assert_close(stats.z_loss, ref_z, **FP32_TOL)
    assert stats.counts_E.tolist() == ref_counts and stats.tokens == B * S
    assert stats.dropped == ref_dropped
    assert (stats.dropped > 0) == (capacity_factor > 0)  # the capacity case really drops
    for name, g in want.items():
        assert got[name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(got[name], g, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_expert_weights_are_arguments_and_compute_runs_of_experts():
    """FSSDP's seam: weights come in as arguments; an expert with no rows runs an empty slice; a forward may
    compute its experts in several calls (overlap chunks), one expert split over two, and backward sums them."""
    torch.manual_seed(1)
    w1, w2 = torch.randn(3, DIM, HIDDEN, requires_grad=True), torch.randn(3, HIDDEN, DIM)
    x_ND = torch.randn(5, DIM)
    y_ND = ExpertWeights(w1, w2, None, "gelu")(x_ND, [2, 0, 3])
    torch.testing.assert_close(y_ND[:2], F.gelu(x_ND[:2] @ w1[0]) @ w2[0])
    torch.testing.assert_close(y_ND[2:], F.gelu(x_ND[2:] @ w1[2]) @ w2[2])
    y_ND.sum().backward()
    assert w1.grad[1].abs().sum() == 0 and w1.grad[0].abs().sum() > 0
    whole = w1.grad.clone()
    w1.grad = None
    weights = ExpertWeights(w1, w2, None, "gelu")
    y_split = torch.cat([weights(x_ND[:1], [1]), weights(x_ND[1:3], [1, 0, 1]), weights(x_ND[3:], [2], first=2)])
    torch.testing.assert_close(y_split, y_ND)
    y_split.sum().backward()
    torch.testing.assert_close(w1.grad, whole)


@pytest.mark.parametrize("shared_expert", [False, True])
def test_sub_batches_begun_apart_and_finished_together_match_one_forward(shared_expert):
    """``moe.overlap_sub_batches``: begin (route, dispatch) per sub-batch, finish all at once - the outputs, the
    gradients and the whole batch's stats (router sums added before the losses) of one forward."""
    x_BSD = torch.randn(3, S, DIM)
    results = []
    for split in (False, True):
        moe = make_moe(shared_experts=int(shared_expert))
        x = x_BSD.clone().requires_grad_(True)
        if split:  # uneven on purpose: 2 sequences, then 1
            y_BSD = torch.cat(moe.finish([moe.begin(x[:2]), moe.begin(x[2:])]))
        else:
            y_BSD = moe(x)
        (y_BSD.square().sum() + moe.stats.aux_loss + moe.stats.z_loss).backward()
        results.append((y_BSD, x.grad, {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}, moe.stats))
    (y, x_grad, grads, stats), (y_split, x_grad_split, grads_split, stats_split) = results
    torch.testing.assert_close(y_split, y, **FP32_TOL)
    torch.testing.assert_close(x_grad_split, x_grad, **FP32_TOL)
    assert grads.keys() == grads_split.keys() and len(grads) >= 3
    for name in grads:
        torch.testing.assert_close(grads_split[name], grads[name], **FP32_TOL, msg=name)
    assert torch.equal(stats_split.counts_E, stats.counts_E) and stats_split.tokens == stats.tokens == 3 * S
    torch.testing.assert_close(stats_split.aux_loss, stats.aux_loss)
    torch.testing.assert_close(stats_split.z_loss, stats.z_loss)


def test_block_with_sub_batches_matches_the_plain_block():
    """The block that interleaves sub-batches (attention of one while the other's tokens travel) computes what
    the plain block does, an uneven split included; capacity dropping refuses to be split."""
    from hecate.trainer.config import ModelConfig
    from hecate.trainer.model import Block, rope_tables

    cfg = ModelConfig(dim=DIM, n_heads=2, n_layers=1, seq_len=S)
    x_BSD, rope = torch.randn(5, S, DIM), rope_tables(S, DIM // 2, cfg.rope_theta)
    outputs = []
    for sub_batches in (1, 2):
        torch.manual_seed(0)
        block = Block(cfg, MoEConfig(num_experts=E, top_k=K, ffn_dim=HIDDEN, overlap_sub_batches=sub_batches))
        y_BSD = block(x_BSD, *rope)
        y_BSD.square().mean().backward()
        outputs.append((y_BSD, block.attn.qkv.weight.grad, block.ffn.experts.w1.grad))
    for plain, interleaved in zip(*outputs):
        torch.testing.assert_close(interleaved, plain, **FP32_TOL)
    moe = make_moe(capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity"):
        moe.finish([moe.begin(x_BSD[:2, :, :DIM]), moe.begin(x_BSD[2:])])


def record(store: list):
    def reduce(sums: RouterSums) -> RouterSums:
        store.append(sums)
        return sums

    return reduce


def combined_with(other: RouterSums, offset_E: torch.Tensor):
    """What an all-reduce over two ranks returns to one of them: the sums of both, and the pairs that the
    earlier rank placed."""

    def reduce(local: RouterSums) -> RouterSums:
        return RouterSums(
            counts_E=local.counts_E + other.counts_E,
            prob_sum_E=local.prob_sum_E + other.prob_sum_E,
            lse_sq_sum=local.lse_sq_sum + other.lse_sq_sum,
            tokens=local.tokens + other.tokens,
            offset_E=offset_E,
        )

    return reduce


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_two_halves_with_reduced_sums_match_the_whole_batch(score):
    """The property DP parity relies on: each half sees the other's sums and, for the later half, the earlier
    half's counts as offsets; then losses, dropping and outputs equal those of the whole batch."""
    moe = make_moe(score=score, capacity_factor=0.75)
    x_BSD, upstream = torch.randn(B, S, DIM), torch.randn(B, S, DIM)
    out_full = moe(x_BSD)
    full = moe.stats
    g_full = grads(moe, (out_full * upstream).sum() + full.aux_loss + full.z_loss)

    local: list[RouterSums] = []
    moe.reduce = record(local)
    moe(x_BSD[:1]), moe(x_BSD[1:])  # each half's own sums (with autograd, as an all-reduce would keep)
    first, second = local
    zeros = torch.zeros(E, dtype=torch.long)
    halves = []
    for x_half, up_half, reduce in (
        (x_BSD[:1], upstream[:1], combined_with(second, zeros)),
        (x_BSD[1:], upstream[1:], combined_with(first, first.counts_E)),
    ):
        moe.reduce = reduce
        out = moe(x_half)
        halves.append((out, up_half, moe.stats))

    assert full.dropped > 0
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), out_full, **FP32_TOL)
    for _, _, stats in halves:
        torch.testing.assert_close(stats.aux_loss, full.aux_loss, **FP32_TOL)
        torch.testing.assert_close(stats.z_loss, full.z_loss, **FP32_TOL)
        assert stats.counts_E.tolist() == full.counts_E.tolist() and stats.tokens == full.tokens
        assert stats.dropped == full.dropped
    # Gradients: the outputs' parts add up; each rank's global aux/z loss already carries the whole gradient
    # (the other half's sums are in its graph), which is what DP's averaging of W identical losses yields.
    out_part = sum((out * up).sum() for out, up, _ in halves)
    g_split = grads(moe, out_part + halves[0][2].aux_loss + halves[0][2].z_loss)
    for name, g in g_full.items():
        torch.testing.assert_close(g_split[name], g, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_later_half_without_offsets_drops_differently():
    """Guards the test above: the offsets matter, so forgetting them would be caught."""
    moe = make_moe(capacity_factor=0.75)
    x_BSD = torch.randn(B, S, DIM)
    out_full = moe(x_BSD)
    local: list[RouterSums] = []
    moe.reduce = record(local)
    moe(x_BSD[:1])
    moe.reduce = combined_with(local[0], torch.zeros(E, dtype=torch.long))
    out_second = moe(x_BSD[1:])
    assert not torch.allclose(out_second, out_full[1:], **FP32_TOL)


def test_bias_is_in_state_dict_and_update_bias_moves_it():
    moe = make_moe(bias_update_rate=0.5)
    before = moe.router.expert_bias.clone()
    moe.update_bias(torch.tensor([10, 6, 2, 6]))
    assert (moe.router.expert_bias - before).tolist() == [-0.5, 0.0, 0.5, 0.0]
    assert "router.expert_bias" in moe.state_dict()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_autocast_forward_and_backward(activation):
    moe = make_moe(activation=activation, shared_experts=1, capacity_factor=1.0)
    x_BSD = torch.randn(B, S, DIM)
    out32 = moe(x_BSD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = moe(x_BSD)
        loss = out16.float().square().mean() + moe.stats.aux_loss + moe.stats.z_loss
    loss.backward()
    assert out16.shape == x_BSD.shape and out16.dtype == x_BSD.dtype
    assert ((out16 - out32).norm() / out32.norm()).item() < BF16_REL_ERR
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
