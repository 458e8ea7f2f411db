"""Evaluation on held-out prompts: k samples each, Avg@k, Pass@1,2,4..k, diversity.

Used by the training run (its live engine, every `eval.every` steps) and by the
scheduled evaluation flow (a fresh engine on a run's newest checkpoint).
"""
from __future__ import annotations

import json
import math
import time

from resrl import seeds
from resrl.errors import UserError
from resrl.metrics import EVAL_PREFIX, evaluation_metrics
from resrl.rewards import is_correct



class RewardError(UserError):
    """Too many reward calls failed: the scores would say nothing."""


def _name(reward_fn) -> str:
    return getattr(reward_fn, "__module__", "?") + ":" + getattr(reward_fn, "__qualname__", "?")


def score_samples(reward_fn, rows, outputs, max_error_fraction: float = 1.0) -> tuple[list[float], int]:
    """Verifier scores for every sample; a reward that raises scores 0 and is counted.

    More failed calls than `max_error_fraction` of the samples raise RewardError: a reward
    that fails everywhere would otherwise train on zeros and end as a "successful" run."""
    from resrl.rewards import math_equiv

    failed_before = math_equiv.COUNTERS["timeouts"] + math_equiv.COUNTERS["errors"]
    scores, errors, first = [], 0, None
    for row, samples in zip(rows, outputs):
        extra = row.get("extra_info")
        if isinstance(extra, str):  # stored as JSON text in the prepared dataset; rewards get a dict
            extra = json.loads(extra) if extra else None
        for _, text, *_ in samples:
            try:
                score = float(reward_fn(row["data_source"], text, row["answer"], extra))
            except Exception as exc:  # noqa: BLE001 - a broken reward call scores 0; too many stop the run
                scores.append(0.0)
                errors += 1
                first = first or f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if not math.isfinite(score):  # a NaN reward would turn every advantage of its group into NaN
                raise RewardError(f"the reward function {_name(reward_fn)} returned {score} for a sample of prompt "
                                  f"{row.get('prompt_id', '?')} (data_source {row['data_source']!r}); rewards must "
                                  "be finite numbers (nothing was trained on these scores).")
            scores.append(score)
    errors += math_equiv.COUNTERS["timeouts"] + math_equiv.COUNTERS["errors"] - failed_before
    if scores and errors / len(scores) > max_error_fraction:
        raise RewardError(f"the reward function {_name(reward_fn)} failed on {errors} of {len(scores)} samples "
                          f"(more than reward.max_error_fraction={max_error_fraction})"
                          + (f"; first error: {first}" if first else " (verifier timeouts or errors)"))
    return scores, errors


def eval_k(eval_cfg, final: bool) -> int:
    """Samples per held-out prompt: `eval.final_k` for the run's last evaluation when set, else `eval.k`."""
    return eval_cfg.final_k if final and eval_cfg.final_k else eval_cfg.k


def evaluate(engine, test_set, eval_cfg, reward_fn, seed: int, step: int, *, final: bool = False,
             max_error_fraction: float = 1.0) -> tuple[dict[str, float], list[dict]]:
    """Metrics (keys `eval/...`: avg_at_K, pass_at_1..K with K = eval_k(...)) and up to
    `num_logged_samples` sample rows."""
    e = eval_cfg
    k = eval_k(e, final)
    t0 = time.time()
    n_prompts = len(test_set) if e.num_prompts is None else min(e.num_prompts, len(test_set))
    rows = [test_set[i] for i in range(n_prompts)]
    outputs = engine.generate([row["prompt_token_ids"] for row in rows], n=k, temperature=e.temperature,
                              top_p=e.top_p, top_k=-1, max_tokens=e.max_tokens,
                              seed=seeds.evaluation(seed))
    scores, errors = score_samples(reward_fn, rows, outputs, max_error_fraction)
    correct = [[is_correct(s) for s in scores[i * k:(i + 1) * k]] for i in range(n_prompts)]
    texts = [[text for _, text, *_ in samples] for samples in outputs]
    lengths = [[len(ids) for ids, *_ in samples] for samples in outputs]
    metrics = {f"{EVAL_PREFIX}{name}": v for name, v in evaluation_metrics(correct, texts, lengths, k).items()}
    metrics["eval/reward_errors"] = float(errors)
    metrics["time/eval_s"] = time.time() - t0
    samples = []
    for row, outs, corr in zip(rows, texts, correct):
        for text, ok in zip(outs, corr):
            if len(samples) < e.num_logged_samples:
                samples.append({"step": step, "prompt_id": row["prompt_id"], "prompt": row["prompt"],
                                "answer": row["answer"], "response": text, "correct": bool(ok)})
    return metrics, samples
