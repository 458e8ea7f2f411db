"""Rewards by `data_source`, with verl's signature so existing reward functions drop in:

    from resrl.rewards import compute_score
    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float

Register more with `@register_reward("my_source")`, or point `reward.function` at a
`module:function` of your own with the same signature.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

from resrl.errors import ConfigError
from resrl.rewards.math_equiv import last_boxed, math_score
from resrl.rewards.numeric import numeric_score

RewardFn = Callable[[str, str, Optional[dict]], float]
CORRECT_SCORE = 0.5  # a score at or above this counts as a correct answer (pass@k, PSR/NSR, ResRL's positives)


def is_correct(score):
    """The one rule for "correct": works on a float or a tensor of scores."""
    return score >= CORRECT_SCORE


REWARDS: dict[str, RewardFn] = {}


def register_reward(*data_sources: str):
    def wrap(fn: RewardFn) -> RewardFn:
        for name in data_sources:
            REWARDS[name] = fn
        return fn
    return wrap


def _unknown_source(data_source: str) -> ConfigError:
    return ConfigError(f"no reward function registered for data_source {data_source!r}; known: "
                       f"{', '.join(sorted(REWARDS))}. Set reward.function to 'module:function'.")


def check_sources(data_sources) -> None:
    """ConfigError unless every data_source has a registered reward (for the default reward.function)."""
    for source in sorted(set(data_sources)):
        if source not in REWARDS:
            raise _unknown_source(source)


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Optional[dict] = None) -> float:
    """Score one response by the verifier registered for `data_source`."""
    try:
        fn = REWARDS[data_source]
    except KeyError:
        raise _unknown_source(data_source) from None
    return float(fn(solution_str, ground_truth, extra_info))


def load_reward_function(spec: Optional[str]) -> Callable[..., float]:
    """`None` -> compute_score; `"pkg.module:fn"` -> that function (verl signature)."""
    if spec is None:
        return compute_score
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any failure while importing the user's module is theirs to fix
        raise ConfigError(f"reward.function {spec!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"reward.function {spec!r} is not callable")
    return fn


@register_reward("synthetic_arith")
def _synthetic(solution_str, ground_truth, extra_info=None):
    return numeric_score(solution_str, ground_truth, strict=True)


@register_reward("gsm8k", "openai/gsm8k")
def _gsm8k(solution_str, ground_truth, extra_info=None):
    return numeric_score(solution_str, ground_truth)


MATH_SOURCES = ("math", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
                "math_dapo", "math_dapo_reasoning", "aime", "amc")


@register_reward(*MATH_SOURCES)
def _math(solution_str, ground_truth, extra_info=None):
    gold = last_boxed(ground_truth) or ground_truth
    return math_score(solution_str, gold)
