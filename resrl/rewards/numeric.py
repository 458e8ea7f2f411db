"""Numeric final answers (GSM8K style): find the final answer, compare as numbers.

Conventions tried in order, the last occurrence of the first that matches wins:
`#### N`, `\\boxed{N}`, "the (final) answer is N", "Answer: N" / "A: N" (also bold),
then - unless strict - the last number in the text. Numbers are compared after
removing thousands separators, currency signs and trailing zeros ("1,000.00" == "1000").
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUM = r"-?\s?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\s?\$?\s?\.\d+"
_NUM_RE = re.compile(_NUM)
_CONVENTIONS = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\s*\{\s*\\?\$?\s*(" + _NUM + r")\s*\}"),
    re.compile(r"(?i)the\s+(?:final\s+)?answer\s+is\s*:?\s*\**\s*\\?\$?\s*(" + _NUM + ")"),
    re.compile(r"(?im)(?:^|\s|\*\*)(?:final\s+)?(?:answer|a)\s*:\s*\**\s*(" + _NUM + ")"),
]


def extract_final_answer(text: str, strict: bool = False) -> str | None:
    """The final-answer string by the conventions above, or None."""
    for pattern in _CONVENTIONS:
        found = pattern.findall(text)
        if found:
            return found[-1]
        if strict:  # strict mode accepts only the "####" convention
            return None
    if strict:
        return None
    numbers = _NUM_RE.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    cleaned = re.sub(r"[\s$,]", "", str(text)).rstrip(".")
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numeric_score(solution_str: str, ground_truth: str, strict: bool = False) -> float:
    """1.0 when the final answer equals the ground truth as a number, else 0.0."""
    truth = parse_number(ground_truth)
    if truth is None:
        raise ValueError(f"ground truth {ground_truth!r} is not a number")
    got = parse_number(extract_final_answer(solution_str, strict=strict))
    return 1.0 if got is not None and got == truth else 0.0


def gsm8k_ground_truth(answer_field: str) -> str | None:
    """The number after '####' in a GSM8K `answer` field, normalized (None if absent)."""
    m = re.search(r"####\s*(.+?)\s*$", answer_field.strip())
    if not m:
        return None
    value = parse_number(m.group(1))
    return None if value is None else _canonical(value)


def _canonical(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text
