"""The clipped policy-gradient loss, its aggregation modes, and the KL estimators.

Aggregation is written as per-token coefficients computed once over the whole
(mini-)batch: the loss of any micro-batch is `sum(coef * token_loss)` over its tokens,
so summing micro-batch losses gives exactly the mini-batch loss, whatever the
micro-batch size.
"""
from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_CORRECTIONS = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")
KL_TYPES = ("k1", "k2", "k3")  # Schulman's estimators of KL(pi || ref), see kl_estimate

# The token sums `policy_loss` returns; the trainer adds them over a step's micro-batches (and ranks)
# and divides by "tokens". kl_ref comes only with a reference model, rollout_corr/* only with a correction.
SUMMED_KEYS = ("tokens", "pg_loss", "clip_frac", "approx_kl", "entropy")
KL_SUMMED_KEYS = ("kl_ref",)
CORRECTION_SUMMED_KEYS = ("rollout_corr/weight_mean", "rollout_corr/changed_frac")


def summed_keys(*, kl: bool, correction: bool) -> tuple[str, ...]:
    """The keys of `policy_loss`'s sums for a run with (or without) the KL term and a rollout correction."""
    return SUMMED_KEYS + (KL_SUMMED_KEYS if kl else ()) + (CORRECTION_SUMMED_KEYS if correction else ())


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


def rollout_correction_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *,
                               mode: str, cap: float = 2.0, low: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights (B, T) that correct for sampling from the rollout engine's policy
    (log-probs `sampler_logp`) instead of the trainer's old policy (`old_logp`).

    The importance ratio is rho = pi_old / pi_sampler, per token or, for the `seq_*` modes,
    per sequence (the product over its tokens, given to each of them):

    none       1 everywhere
    token_tis  min(rho_t, cap)                      truncated IS (Yao et al. 2025)
    seq_tis    min(rho_seq, cap)
    token_mis  rho_t if low <= rho_t <= cap else 0  masked IS: tokens outside the band get no gradient
    seq_mis    rho_seq if low <= rho_seq <= cap else 0 (the whole sequence)

    Tokens outside `mask`, and tokens the sampler gave no log-prob for (NaN), count as
    rho = 1. The weights carry no gradient. Also returns the bool (B, T) map of the
    response tokens whose weight the cap or the band changed (truncated or masked).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; choose one of {ROLLOUT_CORRECTIONS}")
    valid = mask.bool() & ~torch.isnan(sampler_logp)
    if mode == "none":
        return torch.ones_like(old_logp), torch.zeros_like(valid)
    with torch.no_grad():
        log_rho = torch.where(valid, old_logp.detach().double() - sampler_logp.double(), 0.0)
        if mode.startswith("seq"):
            log_rho = log_rho.sum(dim=1, keepdim=True).expand_as(log_rho)
        rho = log_rho.clamp(-20.0, 20.0).exp()
        if mode.endswith("tis"):
            weights = rho.clamp(max=cap)
            changed = rho > cap
        else:
            kept = (rho >= low) & (rho <= cap)
            weights = torch.where(kept, rho, 0.0)
            changed = ~kept
        changed = changed & mask.bool()
        return torch.where(mask.bool(), weights, 1.0).to(old_logp.dtype), changed


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
    sampler_logp: torch.Tensor | None = None,
    rollout_correction: str = "none",
    correction_cap: float = 2.0,
    correction_low: float = 0.5,
):
    """Scalar loss of one micro-batch and token sums for the step's metrics.

    With `sampler_logp` (the rollout engine's log-probs of the sampled tokens) and a
    `rollout_correction` mode other than "none", the policy-gradient term of each token is
    multiplied by `rollout_correction_weights(old_logp, sampler_logp, ...)`."""
    pg, is_clipped, ratio = clipped_token_loss(logp, old_logp, adv, clip_low=clip_low,
                                               clip_high=clip_high, dual_clip=dual_clip)
    m = mask.float()
    correction_sums = {}
    if sampler_logp is not None and rollout_correction != "none":
        weights, changed = rollout_correction_weights(old_logp, sampler_logp, mask, mode=rollout_correction,
                                                      cap=correction_cap, low=correction_low)
        pg = pg * weights
        correction_sums = dict(zip(CORRECTION_SUMMED_KEYS, ((weights * m).sum(), (changed.float() * m).sum())))
    loss = (pg * coef).sum()
    with torch.no_grad():
        log_ratio = (logp - old_logp).detach()
        sums = {
            "tokens": m.sum(),
            "pg_loss": (pg.detach() * coef).sum(),
            "clip_frac": (is_clipped.float() * m).sum(),
            "approx_kl": (((log_ratio.exp() - 1.0) - log_ratio) * m).sum(),  # k3 of KL(old || new)
            **correction_sums,
        }
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * (entropy * coef).sum()
        sums["entropy"] = (entropy.detach() * m).sum()
    if ref_logp is not None and kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_type)
        loss = loss + kl_coef * (kl * coef).sum()
        sums[KL_SUMMED_KEYS[0]] = (kl.detach() * m).sum()
    return loss, sums
