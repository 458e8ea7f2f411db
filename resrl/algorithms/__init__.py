"""RL algorithms for verifiable rewards, registered by name.

    from resrl.algorithms import ALGORITHMS, get_algorithm, residual_token_weights
"""
from resrl.algorithms.registry import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from resrl.algorithms.residual import SVD_METHODS, ResidualStats, residual_token_weights
from resrl.algorithms.losses import (
    LOSS_AGGREGATIONS,
    KL_TYPES,
    ROLLOUT_CORRECTIONS,
    SUMMED_KEYS,
    summed_keys,
    clipped_token_loss,
    kl_estimate,
    policy_loss,
    rollout_correction_weights,
    token_coefficients,
)
from resrl.algorithms import advantages as _builtins  # noqa: F401  (registers the built-in algorithms)

__all__ = [
    "ALGORITHMS", "Algorithm", "get_algorithm", "register_algorithm",
    "ResidualStats", "residual_token_weights",
    "LOSS_AGGREGATIONS", "ROLLOUT_CORRECTIONS", "clipped_token_loss", "kl_estimate", "policy_loss",
    "rollout_correction_weights", "token_coefficients", "SUMMED_KEYS", "summed_keys", "KL_TYPES", "SVD_METHODS",
]
