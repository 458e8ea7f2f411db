"""MATH-style answers: hand-written equivalences and non-equivalences, and the
verifier in worker threads, with a time limit that holds."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from resrl.rewards import compute_score
from resrl.rewards.math_equiv import COUNTERS, last_boxed, math_score

EQUIVALENT = [
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
    ("$\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}"),
    ("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}"),
    ("$\\boxed{(1, 2]}$", "(1,2]"),
    ("$\\boxed{x^2+2x+1}$", "(x+1)^2"),
    ("$\\boxed{\\frac{\\pi}{2}}$", "\\pi/2"),
    ("So $x = \\boxed{-3}$", "-3"),
    ("$\\boxed{10\\%}$", "10"),
    ("$\\boxed{\\{1, 2, 3\\}}$", "\\{3, 2, 1\\}"),
]
NOT_EQUIVALENT = [
    ("$\\boxed{\\frac{1}{3}}$", "0.33"),
    ("$\\boxed{(1, 2)}$", "(1,2]"),
    ("$\\boxed{2\\sqrt{3}}$", "\\sqrt{8}"),
    ("$\\boxed{x^2+1}$", "(x+1)^2"),
    ("$\\boxed{-3}$", "3"),
    ("no answer at all", "5"),
]


@pytest.mark.parametrize("response, gold", EQUIVALENT)
def test_equivalent(response, gold):
    assert compute_score("math", response, gold) == 1.0


@pytest.mark.parametrize("response, gold", NOT_EQUIVALENT)
def test_not_equivalent(response, gold):
    assert compute_score("math", response, gold) == 0.0


def test_gold_given_as_a_boxed_solution():
    assert compute_score("lighteval/MATH", "$\\boxed{7}$", "so it is $\\boxed{7}$") == 1.0


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("none") is None


def test_runs_in_worker_threads():
    cases = EQUIVALENT[:4] + NOT_EQUIVALENT[:4]
    expected = [1.0] * 4 + [0.0] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: compute_score("math", *c), cases))
    assert got == expected
    assert threading.current_thread() is threading.main_thread()


def test_time_limit_scores_zero_and_is_counted():
    math_score("$\\boxed{1}$", "1")  # a warm worker in this thread
    before = COUNTERS["timeouts"]
    t = time.time()
    # comparing two factorials of a million takes sympy ~15 s here
    assert math_score("$\\boxed{1000003!}$", "1000004!", timeout_s=0.5) == 0.0
    assert time.time() - t < 5
    assert COUNTERS["timeouts"] == before + 1
    assert math_score("$\\boxed{2}$", "2") == 1.0  # a fresh worker takes over
