"""The embedded task: multi-step integer arithmetic with a worked solution.

    question: "7+12-5=?"
    solution: " 7+12=19, 19-5=14. #### 14"
    answer:   "14"

Problems are generated deterministically from a seed; train and held-out splits
never share a question. The verifier accepts the GSM8K-style "#### N" final answer.
"""
from __future__ import annotations

import random

DATA_SOURCE = "synthetic_arith"


def make_problem(rng: random.Random, min_terms: int, max_terms: int, max_operand: int, ops: str):
    k = rng.randint(min_terms, max_terms)
    nums = [rng.randint(0, max_operand) for _ in range(k)]
    signs = [rng.choice(ops) for _ in range(k - 1)]
    expr, acc, steps = str(nums[0]), nums[0], []
    for op, n in zip(signs, nums[1:]):
        new = acc + n if op == "+" else acc - n if op == "-" else acc * n
        steps.append(f"{acc}{op}{n}={new}")
        expr += f"{op}{n}"
        acc = new
    return f"{expr}=?", " " + ", ".join(steps) + f". #### {acc}", str(acc)


def generate_rows(cfg, seed: int) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} rows with question, solution, answer, data_source, prompt_id."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    space = sum((cfg.max_operand + 1) ** k * len(cfg.ops) ** (k - 1)
                for k in range(cfg.min_terms, cfg.max_terms + 1))
    wanted = cfg.num_test + cfg.num_train
    if wanted > 0.5 * space:
        raise ValueError(f"data.synthetic asks for {wanted} distinct problems but only {space} exist "
                         "with these settings; raise max_operand or max_terms.")
    for split, count in (("test", cfg.num_test), ("train", cfg.num_train)):
        rows = []
        while len(rows) < count:
            q, sol, ans = make_problem(rng, cfg.min_terms, cfg.max_terms, cfg.max_operand, cfg.ops)
            if q in seen:
                continue
            seen.add(q)
            rows.append({"question": q, "solution": sol, "answer": ans, "data_source": DATA_SOURCE,
                         "prompt_id": f"{split}-{len(rows):06d}"})
        out[split] = rows
    return out
