"""Pass@k against brute-force enumeration; Avg@k and diversity by hand."""
import itertools
import math

import pytest

from resrl.metrics import (advantage_metrics, avg_at_k, diversity, evaluation_metrics, k_values, pass_at_k,
                           pass_at_k_table, rollout_metrics)


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


def test_evaluation_metrics_by_hand():
    correct = [[True, False], [False, False]]
    m = evaluation_metrics(correct, [["a b", "a b"], ["x", "y"]], [[3, 5], [2, 2]], k=2)
    assert m["avg_at_2"] == pytest.approx(0.25) and m["k"] == 2.0
    assert m["pass_at_1"] == pytest.approx(0.25) and m["pass_at_2"] == pytest.approx(0.5)
    assert m["distinct_responses"] == pytest.approx(0.75) and m["response_length"] == pytest.approx(3.0)


def test_rollout_and_advantage_metrics_by_hand():
    import torch

    from resrl.batch import RolloutBatch

    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])  # group 0 mixed, group 1 all wrong
    batch = RolloutBatch([[1]] * 4, [[5, 6, 7], [5, 9], [5, 6, 2], [8]], scores * 0.5, scores, torch.tensor([0, 0, 1, 1]))
    m = rollout_metrics(batch, n=2, max_tokens=3, stop_ids={2})
    assert m == {"reward_mean": 0.125, "pass_rate": 0.25, "response_length": 2.25,
                 "truncated_frac": 0.25,  # [5, 6, 7] hit the budget; [5, 6, 2] ended on a stop token
                 "mixed_group_frac": 0.5}
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    a = advantage_metrics(adv, mask, batch.correct[:2])
    assert a["adv/mean"] == pytest.approx(1 / 3) and a["adv/abs_mean"] == 1.0
    assert a["adv/pos_token_frac"] == pytest.approx(2 / 3) and a["batch/frac_positive"] == 0.5
