"""Turning a batch's verifier scores into the rewards the algorithm sees (`reward.length_scale`)."""
from __future__ import annotations

import torch

from resrl.rewards import is_correct


def length_scale(length: int, start: int, max_len: int, end_scale: float) -> float:
    """1 up to `start` tokens, then linearly down to `end_scale` at `max_len`."""
    if length <= start or max_len <= start:
        return 1.0
    frac = min(1.0, (length - start) / (max_len - start))
    return 1.0 - (1.0 - end_scale) * frac


def shape_rewards(scores: list[float], lengths: list[int], length_cfg, max_tokens: int) -> torch.Tensor:
    """The rewards of a batch: the scores, with each correct response's scaled down by its length
    when `reward.length_scale.enabled` (section `length_cfg`)."""
    rewards = torch.tensor(scores)
    if length_cfg.enabled:
        for i, n in enumerate(lengths):
            if is_correct(scores[i]):
                rewards[i] *= length_scale(n, length_cfg.start_tokens, max_tokens, length_cfg.end_scale)
    return rewards
