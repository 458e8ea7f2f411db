"""Every metric computed from samples, in one place: Avg@k, the unbiased Pass@k estimator,
response diversity, sampler-trainer agreement, and the per-step figures of a rollout batch
and of its advantages.

A new metric goes here: add it to `evaluation_metrics` (held-out samples, logged as
`eval/<name>`), `rollout_metrics` (a step's rollouts, `train/<name>`) or
`advantage_metrics` (a step's advantages, `train/<name>`); whatever they return is logged
to MLflow under that name, nothing else changes. Figures that need the model itself (the
loss, gradient norm, likelihood displacement) are computed by the trainer.
"""
from __future__ import annotations

from typing import Sequence

# The names of the held-out metrics, written here only: `eval/pass_at_<k>` and `eval/avg_at_<k>`.
EVAL_PREFIX = "eval/"
PASS_PREFIX, AVG_PREFIX = "pass_at_", "avg_at_"
EVAL_K = EVAL_PREFIX + "k"  # the number of samples per prompt of that evaluation


def pass_key(k: int) -> str:
    return f"{EVAL_PREFIX}{PASS_PREFIX}{k}"


def avg_key(k: int) -> str:
    return f"{EVAL_PREFIX}{AVG_PREFIX}{k}"


def is_pass_key(name: str) -> bool:
    return name.startswith(EVAL_PREFIX + PASS_PREFIX)


def is_avg_key(name: str) -> bool:
    return name.startswith(EVAL_PREFIX + AVG_PREFIX)


def k_of(name: str) -> int | None:
    """k of a Pass@k / Avg@k name (`eval/pass_at_16` -> 16), None for any other name."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if (is_pass_key(name) or is_avg_key(name)) and tail.isdigit() else None


def pass_table(metrics: dict[str, float]) -> dict[int, float]:
    """{k: Pass@k} of a metrics dict."""
    return {k_of(name): v for name, v in metrics.items() if is_pass_key(name) and k_of(name) is not None}



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
    max absolute difference, the mean and max token importance ratio pi_trainer / pi_sampler
    (1 when they agree; verl and TRL log the same figure to catch a stale weight sync or
    a numerics mismatch between the inference engine and the trainer; it is the ratio the
    rollout correction weights with), and k3's estimate of KL(sampler || trainer) per token
    (rho - 1 - log rho, from the sampler's own samples: unbiased, >= 0).
    """
    import torch

    keys = ("sampler_logp_diff_mean", "sampler_logp_diff_max", "sampler_ratio_mean", "sampler_ratio_max",
            "sampler_kl_k3")
    valid = mask.bool() & ~torch.isnan(sampler_logp)
    if not bool(valid.any()):
        return dict.fromkeys(keys, float("nan"))
    diff = (trainer_logp.double() - sampler_logp.double())[valid]
    log_rho = diff.clamp(-20, 20)
    rho = log_rho.exp()
    return dict(zip(keys, (float(diff.abs().mean()), float(diff.abs().max()), float(rho.mean()), float(rho.max()),
                           float((rho - 1.0 - log_rho).mean()))))


def evaluation_metrics(correct: Sequence[Sequence[bool]], texts: Sequence[Sequence[str]],
                       lengths: Sequence[Sequence[int]], k: int) -> dict[str, float]:
    """Held-out figures from k samples per prompt: whether each is correct, its text, its length in tokens."""
    out = {f"{AVG_PREFIX}{k}": avg_at_k(correct), "k": float(k)}
    out.update({f"{PASS_PREFIX}{j}": v for j, v in pass_at_k_table(correct, k).items()})
    out.update(diversity(texts))
    out["response_length"] = sum(n for prompt in lengths for n in prompt) / sum(len(prompt) for prompt in lengths)
    return out


def rollout_metrics(batch, n: int, max_tokens: int, stop_ids: set[int]) -> dict[str, float]:
    """A step's rollout batch (`resrl.batch.RolloutBatch`, n samples per prompt, groups in order):
    reward, pass rate, response length, the share cut at `max_tokens` before a stop token, and
    the share of groups with both correct and incorrect samples (the only ones group algorithms learn from)."""
    import torch

    lengths = torch.tensor([len(x) for x in batch.response_ids], dtype=torch.float)
    truncated = [len(x) >= max_tokens and x[-1] not in stop_ids for x in batch.response_ids]
    group_rate = batch.correct.view(-1, n).float().mean(1)
    return {
        "reward_mean": float(batch.rewards.mean()),
        "pass_rate": float(batch.correct.float().mean()),
        "response_length": float(lengths.mean()),
        "truncated_frac": float(torch.tensor(truncated).float().mean()),
        "mixed_group_frac": float(((group_rate > 0) & (group_rate < 1)).float().mean()),
    }


def advantage_metrics(adv, mask, correct) -> dict[str, float]:
    """A step's token advantages (B, T) over the response tokens (`mask`), and its share of correct samples."""
    valid = adv[mask]
    return {
        "adv/mean": float(valid.mean()) if valid.numel() else 0.0,
        "adv/abs_mean": float(valid.abs().mean()) if valid.numel() else 0.0,
        "adv/pos_token_frac": float((valid > 0).float().mean()) if valid.numel() else 0.0,
        "batch/frac_positive": float(correct.float().mean()),
    }
