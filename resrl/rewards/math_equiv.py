"""MATH-style answers: symbolic equivalence with math-verify, safely.

math-verify's own time limit uses `signal.alarm`, which only works on the main
thread (elsewhere rewards silently become 0). Here the check runs in a separate
worker *process* (plain `subprocess`, so it also works inside daemonic pool
workers) with math-verify's signal timeouts turned off; the caller waits at most
`timeout_s` per call, then kills and restarts the worker. A timeout or a parser
error scores 0 and is counted in `COUNTERS`; nothing hangs.
"""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
from collections import Counter

COUNTERS: Counter = Counter()   # "calls", "timeouts", "errors"
_LOCAL = threading.local()      # one worker per thread: calls never wait on each other
DEFAULT_TIMEOUT_S = 5.0


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


class _Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "resrl.rewards._math_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.next_id = 0

    def ask(self, pred: str, gold: str, timeout_s: float) -> dict | None:
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": self.next_id, "pred": pred, "gold": gold}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("math worker exited")
        reply = json.loads(line)
        return reply if reply.get("id") == self.next_id else None

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def _worker() -> _Worker:
    w = getattr(_LOCAL, "worker", None)
    if w is None or w.proc.poll() is not None:
        w = _LOCAL.worker = _Worker()
    return w


def set_timeout(seconds: float) -> None:
    """Per-call time limit used when math_score is called without one (reward.timeout_s)."""
    global DEFAULT_TIMEOUT_S
    DEFAULT_TIMEOUT_S = float(seconds)


def math_score(solution_str: str, ground_truth: str, timeout_s: float | None = None) -> float:
    """1.0 if the response's final answer is mathematically equal to `ground_truth`, else 0.0."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    COUNTERS["calls"] += 1
    # the worker's first call pays for importing sympy: give it extra time once
    w = _worker()
    first = w.next_id == 0
    try:
        reply = w.ask(solution_str, ground_truth, timeout_s + (30.0 if first else 0.0))
    except (OSError, RuntimeError, ValueError):
        reply = {"error": "worker"}
        w.kill()
        _LOCAL.worker = None
    if reply is None:
        COUNTERS["timeouts"] += 1
        w.kill()
        _LOCAL.worker = None
        return 0.0
    if reply.get("error"):
        COUNTERS["errors"] += 1
        return 0.0
    return float(reply["score"])
