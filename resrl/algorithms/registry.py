"""Algorithms by name.

An algorithm is two functions: one from a batch's rewards to one advantage per
sequence, and optionally one that rescales advantages token by token from the
trainer's hidden states. Everything else (the clipped loss, aggregation, the
DeepSpeed step) is shared, so two algorithms differ only where their papers differ.

    @register_algorithm("my_algo", needs_groups=True)
    def my_advantages(rewards, correct, group_ids, params): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from resrl.errors import ConfigError

# (rewards (B,), correct (B,) bool, group_ids (B,) long, params) -> advantages (B,)
AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
# (hidden (B,T,H), response_mask, correct, group_ids, params) -> (weights (B,T), stats)
TokenWeightFn = Callable[..., tuple]


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: AdvantageFn
    needs_groups: bool                       # uses group statistics: needs n >= 2 samples per prompt
    token_weights: Optional[TokenWeightFn] = None
    loss_agg: Optional[str] = None           # forces this loss aggregation when set
    # train only on samples whose advantage is non-zero: the others leave the batch (and
    # the loss denominator) instead of diluting it by the pass rate
    skip_zero_advantage: bool = False

    def effective_loss_agg(self, configured: str) -> str:
        return self.loss_agg or configured

    def weights_to_compute(self, diagnostics: bool) -> Optional[TokenWeightFn]:
        """The token weights the trainer computes in its no-grad pass: this algorithm's own (applied),
        else - with `algorithm.diagnostics` on - the registry's diagnostic weights (logged only, so a
        baseline's run shows what ResRL would see)."""
        return self.token_weights or (DIAGNOSTIC_TOKEN_WEIGHTS.get("fn") if diagnostics else None)


ALGORITHMS: dict[str, Algorithm] = {}
# the token weights logged for every algorithm (set by the algorithm registered with diagnostic_weights=True)
DIAGNOSTIC_TOKEN_WEIGHTS: dict[str, TokenWeightFn] = {}


def register_algorithm(name: str, *, needs_groups: bool, token_weights: Optional[TokenWeightFn] = None,
                       loss_agg: Optional[str] = None, skip_zero_advantage: bool = False,
                       diagnostic_weights: bool = False):
    """Decorator: register an advantage function under `name`. With `diagnostic_weights`, its
    `token_weights` are also computed (not applied) for every other algorithm when
    `algorithm.diagnostics` is on."""
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        if diagnostic_weights:
            if token_weights is None or DIAGNOSTIC_TOKEN_WEIGHTS:
                raise ValueError(f"algorithm {name!r}: diagnostic_weights needs token_weights and only one "
                                 "algorithm may set it")
            DIAGNOSTIC_TOKEN_WEIGHTS["fn"] = token_weights
        ALGORITHMS[name] = Algorithm(name, fn, needs_groups, token_weights, loss_agg, skip_zero_advantage)
        return fn
    return wrap


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}") from None
