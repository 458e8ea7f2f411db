"""Advantage estimators and the clipped loss on small hand-computed cases."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from resrl.algorithms import ALGORITHMS, clipped_token_loss, get_algorithm, kl_estimate, token_coefficients

P = OmegaConf.create(dict(eps=1e-6, pos_weight=0.1, wr_lambda=0.1))
# two groups: [1, 0, 0, 1] and [0, 0, 1, 0]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
CORRECT = REWARDS > 0.5
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])


def adv(name):
    return get_algorithm(name).advantages(REWARDS, CORRECT, GROUPS, P)


def test_registry_has_all_algorithms():
    assert set(ALGORITHMS) >= {"grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "resrl"}
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("nope")


def test_grpo_by_hand():
    # group 7: mean 0.5, unbiased std sqrt(1/3); group 3: mean .25, std sqrt(.25*.75*4/3)=0.5
    s7 = math.sqrt(1 / 3)
    expected = [0.5 / s7, -0.5 / s7, -0.5 / s7, 0.5 / s7, -0.25 / 0.5, -0.25 / 0.5, 0.75 / 0.5, -0.25 / 0.5]
    assert adv("grpo").tolist() == pytest.approx(expected, rel=1e-5)


def test_grpo_all_equal_group_is_zero():
    a = get_algorithm("grpo").advantages(torch.ones(4), torch.ones(4, dtype=torch.bool), torch.zeros(4), P)
    assert torch.all(a == 0)


def test_dr_grpo_by_hand_and_forced_aggregation():
    assert adv("dr_grpo").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, 0.75, -0.25])
    assert get_algorithm("dr_grpo").effective_loss_agg("token-mean") == "seq-mean-token-sum-norm"
    assert get_algorithm("grpo").effective_loss_agg("token-mean") == "token-mean"


def test_psr_nsr_w_reinforce():
    assert adv("psr").tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    assert adv("nsr").tolist() == [0, -1, -1, 0, -1, -1, 0, -1]
    assert adv("w_reinforce").tolist() == pytest.approx([0.1, -1, -1, 0.1, -1, -1, 0.1, -1])


def test_resrl_scales_positives_only():
    g, r = adv("grpo"), adv("resrl")
    assert r[CORRECT].tolist() == pytest.approx((0.1 * g[CORRECT]).tolist())
    assert r[~CORRECT].tolist() == pytest.approx(g[~CORRECT].tolist())
    assert get_algorithm("resrl").token_weights is not None and get_algorithm("grpo").token_weights is None


MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ("seq-mean-token-sum-norm", ((1 + 2 + 3) / 8 + 4 / 8) / 2),
])
def test_aggregations_by_hand(agg, expected):
    c = token_coefficients(MASK, agg, max_len=8)
    assert float((c * LOSS).sum()) == pytest.approx(expected)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_sums_to_batch_loss(agg):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=g) > 0.3
    loss = torch.randn(6, 5, generator=g)
    c = token_coefficients(mask, agg, max_len=5)
    whole = (c * loss).sum()
    parts = sum((c[i:i + 2] * loss[i:i + 2]).sum() for i in range(0, 6, 2))
    assert float(parts) == pytest.approx(float(whole), abs=1e-6)


def test_clipped_loss_by_hand():
    old = torch.zeros(1, 5)
    ratio = torch.tensor([[0.5, 1.0, 1.5, 1.5, 5.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]])
    loss, clipped, _ = clipped_token_loss(ratio.log(), old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # A>0: max(-r, -clip(r)) : r=.5 -> -0.5 (unclipped side is larger) ; r=1 -> -1 ; r=1.5 -> -1.28 (clipped)
    # A<0: r=1.5 -> max(1.5, 1.28)=1.5 ; r=5 -> max(5, 1.28)=5, dual-clip caps at 3
    assert loss.tolist()[0] == pytest.approx([-0.5, -1.0, -1.28, 1.5, 3.0])
    assert clipped.tolist()[0] == [False, False, True, False, True]


def test_clipped_loss_without_dual_clip_is_unbounded():
    loss, _, _ = clipped_token_loss(torch.tensor([[math.log(5.0)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                                    clip_low=0.2, clip_high=0.2, dual_clip=None)
    assert float(loss) == pytest.approx(5.0)


def test_clipped_loss_gradient_is_policy_gradient_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -3.0]])
    loss, _, _ = clipped_token_loss(logp, logp.detach(), adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.0, 3.0])  # d/dlogp of -A * ratio at ratio 1


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(0.5)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.125)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    # k3 is clamped to [-10, 10] as verl's low_var_kl: exp(15) - 15 - 1 would be ~3.3e6
    far = kl_estimate(torch.tensor([-20.0], requires_grad=True), torch.tensor([-5.0]), "k3")
    assert float(far.detach()) == 10.0


def test_length_scale_by_hand():
    from resrl.rewards.shaping import length_scale

    assert length_scale(10, 32, 48, 0.7) == 1.0
    assert length_scale(32, 32, 48, 0.7) == 1.0
    assert length_scale(40, 32, 48, 0.7) == pytest.approx(0.85)
    assert length_scale(48, 32, 48, 0.7) == pytest.approx(0.7)
    assert length_scale(60, 32, 48, 0.7) == pytest.approx(0.7)


def test_shape_rewards_scales_only_correct_responses_and_only_when_enabled():
    from types import SimpleNamespace

    from resrl.rewards.shaping import shape_rewards

    scores, lengths = [1.0, 0.0, 1.0, 0.3], [40, 48, 10, 48]
    on = SimpleNamespace(enabled=True, start_tokens=32, end_scale=0.7)
    got = shape_rewards(scores, lengths, on, max_tokens=48)
    assert got.tolist() == pytest.approx([0.85, 0.0, 1.0, 0.3])  # incorrect ones (< 0.5) keep their score
    off = SimpleNamespace(enabled=False, start_tokens=32, end_scale=0.7)
    assert shape_rewards(scores, lengths, off, max_tokens=48).tolist() == pytest.approx(scores)
