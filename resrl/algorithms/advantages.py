"""The built-in algorithms: GRPO, Dr. GRPO, PSR, NSR, W-REINFORCE and ResRL.

`params` is the `algorithm` section of the config (attribute access).
PSR, NSR and W-REINFORCE follow Zhu et al. 2025, "The Surprising Effectiveness of
Negative Reinforcement in LLM Reasoning"; Dr. GRPO follows Liu et al. 2025,
"Understanding R1-Zero-Like Training".
"""
from __future__ import annotations

import torch

from resrl.algorithms.registry import register_algorithm
from resrl.algorithms.residual import residual_token_weights


def group_mean_std(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample mean and unbiased std of its group's rewards (std 0 for singleton groups)."""
    _, gidx = torch.unique(group_ids, return_inverse=True)
    r = rewards.double()
    count = torch.bincount(gidx).double()
    mean = torch.bincount(gidx, weights=r) / count
    sq = torch.bincount(gidx, weights=(r - mean[gidx]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1.0))
    return mean[gidx].to(rewards.dtype), std[gidx].to(rewards.dtype), count[gidx]


@register_algorithm("grpo", needs_groups=True)
def grpo_advantages(rewards, correct, group_ids, params):
    """GRPO: (reward - group mean) / (group std + eps)."""
    mean, std, count = group_mean_std(rewards, group_ids)
    adv = (rewards - mean) / (std + params.eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


@register_algorithm("dr_grpo", needs_groups=True, loss_agg="seq-mean-token-sum-norm")
def dr_grpo_advantages(rewards, correct, group_ids, params):
    """Dr. GRPO: reward - group mean, no std division; token sums over a constant length."""
    mean, _, count = group_mean_std(rewards, group_ids)
    adv = rewards - mean
    return torch.where(count > 1, adv, torch.zeros_like(adv))


# PSR and NSR train on their own samples only: RLVR-Decomposed (the authors' code) takes
# the subset of correct (PSR) or incorrect (NSR) samples before the update, so the others
# do not count in the loss's token mean.
@register_algorithm("psr", needs_groups=False, skip_zero_advantage=True)
def psr_advantages(rewards, correct, group_ids, params):
    """PSR: train on correct samples only (+1), incorrect ones get 0."""
    return correct.to(rewards.dtype)


@register_algorithm("nsr", needs_groups=False, skip_zero_advantage=True)
def nsr_advantages(rewards, correct, group_ids, params):
    """NSR: train on incorrect samples only (-1), correct ones get 0."""
    return -(~correct).to(rewards.dtype)


@register_algorithm("w_reinforce", needs_groups=False)
def w_reinforce_advantages(rewards, correct, group_ids, params):
    """W-REINFORCE: +lambda for correct samples, -1 for incorrect ones."""
    return torch.where(correct, torch.full_like(rewards, params.wr_lambda), -torch.ones_like(rewards))


def resrl_token_weights(hidden_states, response_mask, correct, group_ids, params, seed: int = 0):
    return residual_token_weights(
        hidden_states, response_mask, correct, group_ids,
        rank=params.rank, q_low=params.q_low, q_high=params.q_high, min_weight=params.min_weight,
        max_pos_tokens=params.max_pos_tokens, svd=params.svd, oversample=params.oversample,
        power_iters=params.power_iters, seed=seed, return_stats=True,
    )


@register_algorithm("resrl", needs_groups=True, token_weights=resrl_token_weights, diagnostic_weights=True)
def resrl_advantages(rewards, correct, group_ids, params):
    """ResRL: GRPO advantages, positives x pos_weight, negatives x residual token weights."""
    adv = grpo_advantages(rewards, correct, group_ids, params)
    return torch.where(correct, adv * params.pos_weight, adv)
