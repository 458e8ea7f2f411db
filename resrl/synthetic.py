"""The embedded task: multi-step integer arithmetic with a worked solution.

    question: "7+2-5=?"
    solution: " 7+2=9, 9-5=4. #### 4"
    answer:   "4"

Problems are generated deterministically from a seed; train and held-out splits
never share a question. The verifier accepts the GSM8K-style "#### N" final answer.

The warm-start demonstrations are a mixture (`flawed_fraction`) of this correct
procedure and a flawed one, `skip_last`, that works through the same opening steps
and then answers before using the last term:

    flawed:   " 7+2=9. #### 9"

So the warm-started policy already knows the right procedure (pass@k >> pass@1) and
its failures are mostly a choice - stop or continue at the last step - that RL can
shift, the way RLVR sharpens what a base model already does. Correct and incorrect
responses share their opening tokens, which is the situation ResRL's weighting is
built for. Held-out rows always carry the correct solution.
"""
from __future__ import annotations

import random

from resrl.errors import ConfigError

DATA_SOURCE = "synthetic_arith"
FLAWS = ("none", "skip_last")


def _apply(acc: int, op: str, n: int) -> int:
    return acc + n if op == "+" else acc - n if op == "-" else acc * n


def solution_text(nums: list[int], ops: list[str], upto: int | None = None) -> tuple[str, int]:
    """The worked solution over the first `upto` operations (all by default) and its answer."""
    acc, steps = nums[0], []
    for op, n in list(zip(ops, nums[1:]))[:upto]:
        new = _apply(acc, op, n)
        steps.append(f"{acc}{op}{n}={new}")
        acc = new
    return " " + ", ".join(steps) + f". #### {acc}", acc


def demonstration(nums: list[int], ops: list[str], flawed: bool) -> str:
    """The warm-start text: the correct solution, or `skip_last` when flawed (and there are >= 2 steps)."""
    if flawed and len(ops) >= 2:
        return solution_text(nums, ops, upto=len(ops) - 1)[0]
    return solution_text(nums, ops)[0]


def make_problem(rng: random.Random, min_terms: int, max_terms: int, max_operand: int, ops: str):
    k = rng.randint(min_terms, max_terms)
    nums = [rng.randint(0, max_operand) for _ in range(k)]
    signs = [rng.choice(ops) for _ in range(k - 1)]
    expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(signs, nums[1:]))
    return f"{expr}=?", nums, signs


def problem_space(cfg) -> int:
    return sum((cfg.max_operand + 1) ** k * len(cfg.ops) ** (k - 1) for k in range(cfg.min_terms, cfg.max_terms + 1))


def check_problem_space(cfg) -> None:
    """ConfigError unless the settings have room for the asked number of distinct problems
    (cheap: validation calls it before anything is built)."""
    space = problem_space(cfg)
    wanted = cfg.num_test + cfg.num_train
    if wanted > 0.5 * space:
        raise ConfigError(f"data.synthetic asks for {wanted} distinct problems but only {space} exist "
                          "with these settings; raise max_operand or max_terms, or lower num_train/num_test.")


def generate_rows(cfg, seed: int) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} rows with question, solution, answer, data_source, prompt_id.

    A train row's `solution` is its warm-start demonstration: flawed (`cfg.flaw`) with
    probability `cfg.flawed_fraction`, drawn from the same seed.
    """
    rng = random.Random(seed)
    flaw_rng = random.Random(seed + 7_777)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    check_problem_space(cfg)
    for split, count in (("test", cfg.num_test), ("train", cfg.num_train)):
        rows = []
        while len(rows) < count:
            q, nums, signs = make_problem(rng, cfg.min_terms, cfg.max_terms, cfg.max_operand, cfg.ops)
            if q in seen:
                continue
            seen.add(q)
            flawed = split == "train" and cfg.flaw != "none" and flaw_rng.random() < cfg.flawed_fraction
            _, answer = solution_text(nums, signs)
            rows.append({"question": q, "solution": demonstration(nums, signs, flawed), "answer": str(answer),
                         "data_source": DATA_SOURCE, "prompt_id": f"{split}-{len(rows):06d}"})
        out[split] = rows
    return out
