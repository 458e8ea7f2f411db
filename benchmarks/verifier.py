"""Verifier throughput: scored solutions per second, GSM8K-style and MATH-style.

    python benchmarks/verifier.py [--n 2000]

GSM8K-style: the test split's gold answers written in the supported final-answer
formats (half altered to be wrong). MATH-style: distinct fractions, radicals and
intervals (half not equivalent), through the time-limited worker process; one call
at a time, then from 4 threads (each thread has its own worker).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resrl.rewards import compute_score  # noqa: E402
from resrl.rewards.numeric import gsm8k_ground_truth  # noqa: E402

FORMATS = ["#### {a}", "\\boxed{{{a}}}", "The answer is {a}.", "Answer: {a}", "so we get {a} apples"]


def gsm8k_cases(n: int):
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        path = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "test.jsonl"
    golds = [gsm8k_ground_truth(json.loads(line)["answer"]) for line in path.read_text().splitlines()]
    cases = []
    for i in range(n):
        gold = golds[i % len(golds)]
        shown = gold if i % 2 == 0 else str(int(float(gold)) + 1)
        cases.append((f"Let me think. {i} steps.\n" + FORMATS[i % len(FORMATS)].format(a=shown), gold, i % 2 == 0))
    return cases


def math_cases(n: int):
    cases = []
    for i in range(n):
        a, b = i + 2, i + 3
        kind = i % 3
        if kind == 0:
            pred, gold = f"$\\boxed{{\\frac{{{a}}}{{{b}}}}}$", f"{a}/{b}" if i % 2 == 0 else f"{b}/{a}"
        elif kind == 1:
            pred, gold = f"$\\boxed{{{a}\\sqrt{{2}}}}$", f"\\sqrt{{{2 * a * a}}}" if i % 2 == 0 else f"\\sqrt{{{a}}}"
        else:
            pred, gold = f"$\\boxed{{({a}, {b}]}}$", f"({a},{b}]" if i % 2 == 0 else f"[{a},{b}]"
        cases.append((pred, gold, i % 2 == 0))
    return cases


def run(source, cases, threads=1):
    t = time.perf_counter()
    if threads == 1:
        got = [compute_score(source, p, g) for p, g, _ in cases]
    else:
        with ThreadPoolExecutor(threads) as pool:
            got = list(pool.map(lambda c: compute_score(source, c[0], c[1]), cases))
    secs = time.perf_counter() - t
    correct = sum((g == 1.0) == want for g, (_, _, want) in zip(got, cases))
    return len(cases) / secs, correct / len(cases)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    rate, acc = run("openai/gsm8k", gsm8k_cases(args.n * 10))
    print(f"GSM8K-style numeric:   {rate:10.0f} solutions/s  (agreement with the intended label {acc:.3f})")
    compute_score("math", "$\\boxed{1}$", "1")  # start the worker (imports sympy) before timing
    rate, acc = run("math", math_cases(args.n))
    print(f"MATH-style, 1 thread:  {rate:10.0f} solutions/s  (agreement {acc:.3f})")
    rate, acc = run("math", math_cases(args.n)[::-1], threads=4)
    print(f"MATH-style, 4 threads: {rate:10.0f} solutions/s  (agreement {acc:.3f}; includes starting 4 workers)")


if __name__ == "__main__":
    main()
