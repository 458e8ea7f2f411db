"""Faults to inject into runs (benchmarks/chaos.py and the reliability tests).

    reward.function=benchmarks.faults:nan_reward     the project's verifier, except that call number
                                                      $RESRL_NAN_REWARD_AT (default 1) returns NaN
    reward.function=benchmarks.faults:parity_reward  1 for responses of even length: an untrained model
                                                      gets mixed groups, so its updates are real
"""
from __future__ import annotations

import os

from resrl.rewards import compute_score

_calls = 0


def nan_reward(data_source, solution_str, ground_truth, extra_info=None) -> float:
    global _calls
    _calls += 1
    if _calls == int(os.environ.get("RESRL_NAN_REWARD_AT", "1")):
        return float("nan")
    return compute_score(data_source, solution_str, ground_truth, extra_info)


def parity_reward(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """1 for responses of even length in characters: mixed groups (non-zero advantages, so a real
    update) even for an untrained model, whose verifier scores are all 0."""
    return float(len(solution_str) % 2 == 0)
