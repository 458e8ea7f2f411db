"""Pass@k against brute-force enumeration; Avg@k and diversity by hand."""
import itertools
import math

import pytest

from resrl.metrics import avg_at_k, diversity, k_values, pass_at_k, pass_at_k_table


def brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_form_large_n():
    n, c, k = 200, 7, 50
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)


def test_pass_at_1_is_accuracy_and_table_is_monotone():
    correct = [[True, False, False, False], [False] * 4, [True, True, False, True]]
    table = pass_at_k_table(correct, 4)
    assert list(table) == [1, 2, 4]
    assert table[1] == pytest.approx(avg_at_k(correct)) == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert table[4] == pytest.approx(2 / 3)
    assert all(0 <= v <= 1 for v in table.values())
    assert table[1] <= table[2] <= table[4]


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]


def test_bad_pass_at_k_input():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_diversity():
    d = diversity([["a b c", "a b c"], ["x y", "z w"]])
    assert d["distinct_responses"] == pytest.approx((0.5 + 1.0) / 2)
    # prompt 1: bigrams (a,b),(b,c) twice -> 2 unique / 4; prompt 2: 2 / 2
    assert d["distinct_2"] == pytest.approx((0.5 + 1.0) / 2)
