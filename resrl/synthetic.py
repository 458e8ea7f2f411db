"""The embedded tasks: sums of one-digit numbers with worked solutions.

Two tasks (`data.synthetic.task`), both verified on the GSM8K-style "#### N" answer.

`orders` (the default testbed, built so that ResRL's mechanism can act):

    question: "7+2+5+1=?"
    L (left to right):  " 7+2=9, 9+5=14, 14+1=15. #### 15"
    R (right to left):  " 1+5=6, 6+2=8, 8+7=15. #### 15"
    P (pairs):          " 7+2=9, 5+1=6, 9+6=15. #### 15"
    flawed (`slip`):    " 7+2=9, 9+5=15, 15+1=16. #### 16"   (step 2 one too high, carried on)

  The demonstrations pick one of the `orders` at random, so a prompt has several distinct
  correct answers and the first tokens of every answer, correct or not, are a real choice
  (about ln 3 nats). The flaw does not depend on the order: it strikes in the middle of the
  answer with probability `flawed_fraction`, and always on the *hard* prompts (last operand
  >= `hard_last_operand`). So correct and incorrect answers share uncertain tokens (the order
  choice) produced from identical states, the tokens after the slip differ, and on the hard
  prompts the warm-started policy has (almost) never seen a correct answer: Pass@k is off its
  ceiling. A negative gradient on a wrong answer's order tokens is pure interference with the
  correct answers that chose the same order: the displacement NSR causes and ResRL's weighting
  is built to avoid.

`chain` (the earlier testbed, `conf/chain.yaml`; a fast learning check):

    question: "7+2+5+1=?"   solution: " 7+2=9, 9+5=14, 14+1=15. #### 15"
    flawed (`skip_last`):   " 7+2=9, 9+5=14. #### 14"

  One order; the flaw is a stop-or-continue choice at one fixed token.

Problems are generated deterministically from the base seed; train and held-out splits
never share a question. Held-out rows carry a correct solution (only their answer is used).
"""
from __future__ import annotations

import random

from resrl.errors import ConfigError

DATA_SOURCE = "synthetic_arith"
# Part of the prepared data's cache key: raise it when the rows a config generates change,
# so a cached dataset (and the warm-start trained on it) is never reused for other rows.
VERSION = 2
TASKS = ("orders", "chain")
FLAWS = {"chain": ("none", "skip_last"), "orders": ("none", "slip")}
ORDERS = "LRP"


def _apply(acc: int, op: str, n: int) -> int:
    return acc + n if op == "+" else acc - n if op == "-" else acc * n


def solution_text(nums: list[int], ops: list[str], upto: int | None = None) -> tuple[str, int]:
    """The left-to-right worked solution over the first `upto` operations (all by default) and its answer."""
    acc, steps = nums[0], []
    for op, n in list(zip(ops, nums[1:]))[:upto]:
        new = _apply(acc, op, n)
        steps.append(f"{acc}{op}{n}={new}")
        acc = new
    return " " + ", ".join(steps) + f". #### {acc}", acc


def ordered_solution(nums: list[int], order: str, slip_step: int | None = None,
                     swaps: tuple[bool, ...] = (False, False, False), seps: tuple[str, ...] = (", ", ", ")) -> tuple[str, int]:
    """A sum of four terms worked in `order` (L, R or P); `slip_step` (0-based) writes that step's
    result one too high and carries the wrong value on; `swaps[i]` writes step i's two operands the
    other way round ("5+9" for "9+5"); `seps` are the two separators between the steps. Returns the
    text and its final answer."""
    if len(nums) != 4:
        raise ValueError(f"ordered solutions take four terms, got {nums}")
    a, b, c, d = nums
    plan = {"L": [("x", a, b), ("x", None, c), ("x", None, d)],
            "R": [("x", d, c), ("x", None, b), ("x", None, a)],
            "P": [("y", a, b), ("z", c, d), ("x", "y", "z")]}[order]
    vals: dict[str, int] = {}
    acc, steps = None, []
    for i, (name, left, right) in enumerate(plan):
        lhs = acc if left is None else vals[left] if isinstance(left, str) else left
        rhs = vals[right] if isinstance(right, str) else right
        out = lhs + rhs + (1 if i == slip_step else 0)
        steps.append(f"{rhs}+{lhs}={out}" if swaps[i] else f"{lhs}+{rhs}={out}")
        vals[name] = out
        acc = out if name == "x" else acc
        if name == "z":
            acc = None
    return f" {steps[0]}{seps[0]}{steps[1]}{seps[1]}{steps[2]}. #### {vals['x']}", vals["x"]


def demonstration(nums: list[int], ops: list[str], flawed: bool) -> str:
    """The chain task's warm-start text: correct, or `skip_last` when flawed (and there are >= 2 steps)."""
    if flawed and len(ops) >= 2:
        return solution_text(nums, ops, upto=len(ops) - 1)[0]
    return solution_text(nums, ops)[0]


def is_hard(nums: list[int], cfg) -> bool:
    """The orders task's hard prompts: last operand >= hard_last_operand (null: none)."""
    return cfg.hard_last_operand is not None and nums[-1] >= cfg.hard_last_operand


def make_problem(rng: random.Random, min_terms: int, max_terms: int, max_operand: int, ops: str):
    k = rng.randint(min_terms, max_terms)
    nums = [rng.randint(0, max_operand) for _ in range(k)]
    signs = [rng.choice(ops) for _ in range(k - 1)]
    expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(signs, nums[1:]))
    return f"{expr}=?", nums, signs


def problem_space(cfg) -> int:
    return sum((cfg.max_operand + 1) ** k * len(cfg.ops) ** (k - 1) for k in range(cfg.min_terms, cfg.max_terms + 1))


def check_settings(cfg) -> None:
    """ConfigError for settings the generator cannot honour (cheap: validation calls it before
    anything is built), including too few distinct problems for the asked number."""
    if cfg.task not in TASKS:
        raise ConfigError(f"data.synthetic.task must be one of {', '.join(TASKS)}, got {cfg.task!r}.")
    if cfg.flaw not in FLAWS[cfg.task]:
        raise ConfigError(f"data.synthetic.flaw must be one of {', '.join(FLAWS[cfg.task])} for task "
                          f"{cfg.task}, got {cfg.flaw!r}.")
    if cfg.task == "orders":
        if not (cfg.min_terms == cfg.max_terms == 4 and cfg.ops == "+"):
            raise ConfigError("data.synthetic.task=orders works on sums of four terms: set min_terms=4, "
                              f"max_terms=4, ops='+' (got {cfg.min_terms}/{cfg.max_terms}/{cfg.ops!r}).")
        if not cfg.orders or set(cfg.orders) - set(ORDERS) or len(set(cfg.orders)) != len(cfg.orders):
            raise ConfigError(f"data.synthetic.orders must be distinct letters of {ORDERS}, got {cfg.orders!r}.")
        bad = [x for x in cfg.separators if not isinstance(x, str) or not x or any(c.isdigit() or c in "+=#" for c in x)]
        if not cfg.separators or bad:
            raise ConfigError("data.synthetic.separators must be a non-empty list of non-empty strings without "
                              f"digits, '+', '=' or '#', got {list(cfg.separators)!r}.")
    elif cfg.flaw != "none" and cfg.max_terms < 3:
        raise ConfigError(f"data.synthetic.flaw={cfg.flaw} needs problems of >= 3 terms (two steps); "
                          f"max_terms is {cfg.max_terms}.")
    space = problem_space(cfg)
    wanted = cfg.num_test + cfg.num_train
    if wanted > 0.5 * space:
        raise ConfigError(f"data.synthetic asks for {wanted} distinct problems but only {space} exist "
                          "with these settings; raise max_operand or max_terms, or lower num_train/num_test.")


# the step (0-based) of each order that adds the last term: where a hard prompt's demonstration slips
LAST_TERM_STEP = {"L": 2, "R": 0, "P": 1}


def _orders_solution(nums: list[int], cfg, rng: random.Random, flawed: bool) -> str:
    order = rng.choice(cfg.orders)
    swaps = tuple(cfg.commute and rng.random() < 0.5 for _ in range(3))
    seps = tuple(rng.choice(list(cfg.separators)) for _ in range(2)) if len(cfg.separators) > 1 \
        else (cfg.separators[0],) * 2
    # a hard prompt slips where it adds its large last term: a local cue the warm-start learns
    # sharply, so the warm-started policy (almost) never solves these prompts
    slip = (LAST_TERM_STEP[order] if is_hard(nums, cfg) else 1) if flawed else None
    return ordered_solution(nums, order, slip_step=slip, swaps=swaps, seps=seps)[0]


def generate_rows(cfg, seed: int) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} rows with question, solution, answer, data_source, prompt_id.

    A train row's `solution` is its warm-start demonstration: flawed (`cfg.flaw`) with
    probability `cfg.flawed_fraction` (always on the orders task's hard prompts), drawn
    from the same seed.
    """
    check_settings(cfg)
    rng = random.Random(seed)
    flaw_rng = random.Random(seed + 7_777)
    order_rng = random.Random(seed + 31_337)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, count in (("test", cfg.num_test), ("train", cfg.num_train)):
        rows = []
        while len(rows) < count:
            q, nums, signs = make_problem(rng, cfg.min_terms, cfg.max_terms, cfg.max_operand, cfg.ops)
            if q in seen:
                continue
            seen.add(q)
            flawed = False
            if split == "train" and cfg.flaw != "none":
                flawed = flaw_rng.random() < cfg.flawed_fraction or (cfg.task == "orders" and is_hard(nums, cfg))
            _, answer = solution_text(nums, signs)
            if cfg.task == "orders":
                text = _orders_solution(nums, cfg, order_rng, flawed)
            else:
                text = demonstration(nums, signs, flawed)
            rows.append({"question": q, "solution": text, "answer": str(answer),
                         "data_source": DATA_SOURCE, "prompt_id": f"{split}-{len(rows):06d}"})
        out[split] = rows
    return out
