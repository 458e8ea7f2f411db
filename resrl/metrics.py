"""Evaluation metrics: Avg@k, the unbiased Pass@k estimator, and response diversity."""
from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c correct.

    1 - C(n-c, k) / C(n, k), computed as a running product to avoid huge binomials
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def k_values(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks, v = [], 1
    while v < k:
        ks.append(v)
        v *= 2
    return ks + [k]


def pass_at_k_table(correct_per_prompt: Sequence[Sequence[bool]], k: int) -> dict[int, float]:
    """Mean Pass@j over prompts for j in k_values(k); each prompt has n >= k samples."""
    out = {}
    for j in k_values(k):
        out[j] = sum(pass_at_k(len(c), sum(c), j) for c in correct_per_prompt) / len(correct_per_prompt)
    return out


def avg_at_k(correct_per_prompt: Sequence[Sequence[bool]]) -> float:
    """Mean accuracy over all samples of all prompts (each prompt weighted equally)."""
    return sum(sum(c) / len(c) for c in correct_per_prompt) / len(correct_per_prompt)


def diversity(responses_per_prompt: Sequence[Sequence[str]]) -> dict[str, float]:
    """Distinct-response fraction and distinct-2 (unique / total token bigrams), averaged over prompts."""
    distinct, bigram = [], []
    for responses in responses_per_prompt:
        distinct.append(len(set(responses)) / len(responses))
        grams = [tuple(r.split()[i:i + 2]) for r in responses for i in range(max(len(r.split()) - 1, 0))]
        bigram.append(len(set(grams)) / len(grams) if grams else 0.0)
    n = len(responses_per_prompt)
    return {"distinct_responses": sum(distinct) / n, "distinct_2": sum(bigram) / n}


def sampler_agreement(trainer_logp, sampler_logp, mask) -> dict[str, float]:
    """How far the trainer's log-probs of the sampled tokens are from the sampler's.

    All (B, T); `sampler_logp` is NaN where the sampler gave none. Returns the mean and
    max absolute difference and the mean token importance ratio pi_trainer / pi_sampler
    (1 when they agree; verl and TRL log the same figure to catch a stale weight sync or
    a numerics mismatch between the inference engine and the trainer).
    """
    import torch

    valid = mask.bool() & ~torch.isnan(sampler_logp)
    if not bool(valid.any()):
        nan = float("nan")
        return {"sampler_logp_diff_mean": nan, "sampler_logp_diff_max": nan, "sampler_ratio_mean": nan}
    diff = (trainer_logp.double() - sampler_logp.double())[valid]
    return {"sampler_logp_diff_mean": float(diff.abs().mean()),
            "sampler_logp_diff_max": float(diff.abs().max()),
            "sampler_ratio_mean": float(diff.clamp(-20, 20).exp().mean())}
