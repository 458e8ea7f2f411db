"""Every random stream of a run, derived from the one `seed` key, in one place.

Each stream gets its own formula so that changing how many numbers one of them draws
never shifts another; the large odd multipliers keep the streams of different seeds
and steps apart.
"""
from __future__ import annotations


def prompt_order(seed: int, epoch: int) -> int:
    """The shuffle of the train prompts for one pass over them."""
    return seed * 1_000_003 + epoch


def rollout(seed: int, step: int) -> int:
    """vLLM's sampling at RL step `step`."""
    return seed * 1_000_003 + step * 10_007


def evaluation(seed: int) -> int:
    """vLLM's sampling at every evaluation of a run: the same seed at every step, so steps compare."""
    return seed * 1_000_003 + 999_983


def residual_svd(seed: int, step: int) -> int:
    """ResRL's randomized range finder at RL step `step`."""
    return seed * 100_003 + step


def minibatch_order(seed: int, step: int) -> int:
    """The split of a rollout batch into PPO mini-batches at RL step `step`."""
    return seed * 7_919 + step
