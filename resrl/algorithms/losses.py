"""The clipped policy-gradient loss, its aggregation modes, and the KL estimators.

Aggregation is written as per-token coefficients computed once over the whole
(mini-)batch: the loss of any micro-batch is `sum(coef * token_loss)` over its tokens,
so summing micro-batch losses gives exactly the mini-batch loss, whatever the
micro-batch size.
"""
from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def token_coefficients(mask: torch.Tensor, agg: str, max_len: int | None = None) -> torch.Tensor:
    """(B, T) weights c with `loss = sum(c * token_loss)` for aggregation mode `agg`.

    token-mean               mean over all valid tokens of the batch
    seq-mean-token-sum       mean over sequences of each sequence's token sum
    seq-mean-token-mean      mean over sequences of each sequence's token mean
    seq-mean-token-sum-norm  mean over sequences of token sum / max_len (Dr. GRPO: a
                             constant length normalizer instead of each length)
    """
    m = mask.float()
    n_seq = m.shape[0]
    if agg == "token-mean":
        return m / m.sum().clamp_min(1.0)
    if agg == "seq-mean-token-sum":
        return m / n_seq
    if agg == "seq-mean-token-mean":
        return m / (m.sum(dim=1, keepdim=True).clamp_min(1.0) * n_seq)
    if agg == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the maximum response length)")
        return m / (float(max_len) * n_seq)
    raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {LOSS_AGGREGATIONS}")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":  # clamped to [-10, 10] as verl's "low_var_kl" (the log-ratio first, so exp stays finite)
        r = (-log_ratio).clamp(-20.0, 20.0)
        return (r.exp() - r - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def clipped_token_loss(logp, old_logp, adv, *, clip_low: float, clip_high: float, dual_clip: float | None):
    """PPO's clipped surrogate per token, with clip-higher and dual-clip.

    Returns (loss (B, T), clipped (B, T) bool, ratio (B, T)). `clipped` marks tokens
    whose gradient the clip removed.
    """
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -adv * ratio
    clipped_obj = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_obj)
    is_clipped = clipped_obj > unclipped
    if dual_clip is not None:
        # For A < 0 a huge ratio would give an unbounded loss: cap it at -A * c.
        cap = -adv * dual_clip
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        is_clipped = is_clipped | capped
    return loss, is_clipped, ratio


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    coef: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
):
    """Scalar loss of one micro-batch and token sums for the step's metrics."""
    pg, is_clipped, ratio = clipped_token_loss(logp, old_logp, adv, clip_low=clip_low,
                                               clip_high=clip_high, dual_clip=dual_clip)
    loss = (pg * coef).sum()
    m = mask.float()
    with torch.no_grad():
        log_ratio = (logp - old_logp).detach()
        sums = {
            "tokens": m.sum(),
            "pg_loss": (pg.detach() * coef).sum(),
            "clip_frac": (is_clipped.float() * m).sum(),
            "approx_kl": (((log_ratio.exp() - 1.0) - log_ratio) * m).sum(),  # k3 of KL(old || new)
        }
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * (entropy * coef).sum()
        sums["entropy"] = (entropy.detach() * m).sum()
    if ref_logp is not None and kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_type)
        loss = loss + kl_coef * (kl * coef).sum()
        sums["kl_ref"] = (kl.detach() * m).sum()
    return loss, sums
