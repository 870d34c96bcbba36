"""Router math against values computed by hand: top-k, renormalisation, sigmoid scoring, aux loss, z-loss,
capacity dropping, expert bias.

The logits are written as log(p) + c_t, so that the softmax probabilities are the literal p and
logsumexp(logits_t) is the literal c_t; sigmoid logits are log(s / (1 - s)), so that the scores are s.
"""

import math

import pytest
import torch

from hecate.parallel.moe import Router, aux_loss, route, router_sums, z_loss
from hecate.parallel.moe.capacity import dropped_pairs, expert_capacity, keep_within_capacity

TOL = 1e-6  # fp32 arithmetic on O(1) numbers

PROBS = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.3, 0.15], [0.25, 0.45, 0.1, 0.2]]
LSE = [0.0, 1.0, -1.0, 2.0]
# Top-2 by probability: t0 -> (0, 1), t1 -> (3, 2), t2 -> (0, 2), t3 -> (1, 0); counts per expert (3, 2, 2, 1).
TOP2 = [[0, 1], [3, 2], [0, 2], [1, 0]]


def softmax_logits() -> torch.Tensor:
    return torch.tensor(PROBS, dtype=torch.float64).log().add(torch.tensor(LSE, dtype=torch.float64)[:, None]).float()


def sigmoid_logits(scores: list[list[float]]) -> torch.Tensor:
    s = torch.tensor(scores, dtype=torch.float64)
    return (s / (1 - s)).log().float()


def test_softmax_top2_choices_and_renormalised_weights():
    r = route(softmax_logits(), top_k=2, score="softmax", renormalize=True)
    assert r.experts_TK.tolist() == TOP2
    expected = [[0.4 / 0.7, 0.3 / 0.7], [0.4 / 0.7, 0.3 / 0.7], [0.5 / 0.8, 0.3 / 0.8], [0.45 / 0.7, 0.25 / 0.7]]
    torch.testing.assert_close(r.weights_TK, torch.tensor(expected), atol=TOL, rtol=0)


def test_softmax_without_renormalisation_keeps_probabilities():
    r = route(softmax_logits(), top_k=2, score="softmax", renormalize=False)
    torch.testing.assert_close(
        r.weights_TK, torch.tensor([[0.4, 0.3], [0.4, 0.3], [0.5, 0.3], [0.45, 0.25]]), atol=TOL, rtol=0
    )


def test_sigmoid_scores_choices_and_weights():
    logits = sigmoid_logits([[0.9, 0.5, 0.2, 0.6], [0.1, 0.8, 0.7, 0.4]])
    r = route(logits, top_k=2, score="sigmoid", renormalize=True)
    assert r.experts_TK.tolist() == [[0, 3], [1, 2]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.6, 0.4], [0.8 / 1.5, 0.7 / 1.5]]), atol=TOL, rtol=0)
    raw = route(logits, top_k=2, score="sigmoid", renormalize=False)
    torch.testing.assert_close(raw.weights_TK, torch.tensor([[0.9, 0.6], [0.8, 0.7]]), atol=TOL, rtol=0)
    # the aux loss sees scores normalised per token
    torch.testing.assert_close(r.probs_TE[0], torch.tensor([0.9, 0.5, 0.2, 0.6]) / 2.2, atol=TOL, rtol=0)


def test_aux_loss_softmax_by_hand():
    sums = router_sums(route(softmax_logits(), top_k=2, score="softmax", renormalize=True), num_experts=4)
    assert sums.counts_E.tolist() == [3, 2, 2, 1]
    # f = counts / (T k) = (3, 2, 2, 1) / 8; P = column means of PROBS = (1.25, 1.0, 0.9, 0.85) / 4
    expected = 4 * (3 / 8 * 0.3125 + 2 / 8 * 0.25 + 2 / 8 * 0.225 + 1 / 8 * 0.2125)
    assert expected == pytest.approx(1.05)
    assert aux_loss(sums, top_k=2).item() == pytest.approx(expected, abs=TOL)


def test_aux_loss_sigmoid_uses_normalised_scores():
    logits = sigmoid_logits([[0.9, 0.5, 0.2, 0.6], [0.1, 0.8, 0.7, 0.4]])
    sums = router_sums(route(logits, top_k=1, score="sigmoid", renormalize=True), num_experts=4)
    assert sums.counts_E.tolist() == [1, 1, 0, 0]  # t0 -> 0, t1 -> 1
    p0 = (0.9 / 2.2 + 0.1 / 2.0) / 2
    p1 = (0.5 / 2.2 + 0.8 / 2.0) / 2
    assert aux_loss(sums, top_k=1).item() == pytest.approx(4 * (0.5 * p0 + 0.5 * p1), abs=TOL)


def test_aux_loss_is_one_at_perfect_balance():
    logits = torch.zeros(8, 4)  # uniform probabilities; ties broken somehow, but f sums to 1 and P_e = 1/4
    sums = router_sums(route(logits, top_k=2, score="softmax", renormalize=True), num_experts=4)
    assert aux_loss(sums, top_k=2).item() == pytest.approx(1.0, abs=TOL)


def test_z_loss_is_mean_squared_logsumexp():
    sums = router_sums(route(softmax_logits(), top_k=2, score="softmax", renormalize=True), num_experts=4)
    assert z_loss(sums).item() == pytest.approx((0 + 1 + 1 + 4) / 4, abs=1e-5)


def test_expert_capacity():
    assert expert_capacity(0.0, 4, 2, 4) is None  # dropless
    assert expert_capacity(1.0, 4, 2, 4) == 2
    assert expert_capacity(1.25, 4, 2, 4) == 3  # ceil(2.5)
    assert expert_capacity(1.1, 100, 1, 11) == 10  # no float fuzz: 1.1 * 100 / 11 is exactly 10


def test_capacity_drops_late_pairs_token_major():
    # pairs token-major: (t0,e0) (t0,e1) (t1,e3) (t1,e2) (t2,e0) (t2,e2) (t3,e1) (t3,e0); capacity 2:
    # expert 0 holds t0, t2, t3 -> its third pair (t3, k=1) is dropped
    experts = torch.tensor(TOP2)
    keep = keep_within_capacity(experts, capacity=2, offset_E=torch.zeros(4, dtype=torch.long))
    assert keep.tolist() == [[True, True], [True, True], [True, True], [True, False]]
    assert dropped_pairs(torch.tensor([3, 2, 2, 1]), 2) == 1


def test_capacity_with_offset_from_earlier_ranks():
    # earlier ranks already placed 1 pair of expert 0 and 1 of expert 2: expert 0 keeps only t0,
    # expert 2 keeps only t1
    experts = torch.tensor(TOP2)
    keep = keep_within_capacity(experts, capacity=2, offset_E=torch.tensor([1, 0, 1, 0]))
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert int((~keep).sum()) == 3


def test_expert_bias_changes_choice_not_weights():
    bias = torch.tensor([0.0, 0.0, 0.15, 0.0])  # t0: selection scores (0.4, 0.3, 0.35, 0.1)
    r = route(softmax_logits()[:1], top_k=2, score="softmax", renormalize=True, expert_bias_E=bias)
    assert r.experts_TK.tolist() == [[0, 2]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.4 / 0.6, 0.2 / 0.6]]), atol=TOL, rtol=0)
    raw = route(softmax_logits()[:1], top_k=2, score="softmax", renormalize=False, expert_bias_E=bias)
    torch.testing.assert_close(raw.weights_TK, torch.tensor([[0.4, 0.2]]), atol=TOL, rtol=0)


def test_expert_bias_on_sigmoid_scores():
    logits = sigmoid_logits([[0.9, 0.5, 0.2, 0.6]])
    r = route(logits, top_k=2, score="sigmoid", renormalize=False, expert_bias_E=torch.tensor([0.0, 0.2, 0, 0]))
    assert r.experts_TK.tolist() == [[0, 1]]  # 0.5 + 0.2 beats 0.6
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.9, 0.5]]), atol=TOL, rtol=0)


def test_update_bias_raises_underloaded_and_lowers_overloaded():
    router = Router(dim=8, num_experts=4, top_k=2, score="sigmoid", renormalize=True, bias_update_rate=0.01)
    router.update_bias(torch.tensor([3, 2, 2, 1]))  # mean 2
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.0, 0.0, 0.01]))
    assert "expert_bias" in router.state_dict()


def test_update_bias_is_a_noop_at_rate_zero():
    router = Router(dim=8, num_experts=4, top_k=2, score="softmax", renormalize=True, bias_update_rate=0.0)
    router.update_bias(torch.tensor([3, 2, 2, 1]))
    assert router.expert_bias.tolist() == [0.0] * 4


def test_router_logits_are_fp32_under_bf16_autocast():
    router = Router(dim=8, num_experts=4, top_k=2, score="softmax", renormalize=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(torch.randn(5, 8))
    assert r.logits_TE.dtype == r.weights_TK.dtype == torch.float32
    assert math.isfinite(r.weights_TK.sum().item())
