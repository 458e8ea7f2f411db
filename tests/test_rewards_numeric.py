"""GSM8K-style final-answer extraction and numeric comparison."""
import pytest

from resrl.errors import UserError
from resrl.rewards import compute_score, load_reward_function
from resrl.rewards.numeric import extract_final_answer, gsm8k_ground_truth, numeric_score


@pytest.mark.parametrize("text", [
    "so 3+4=7. #### 42",
    "The total is \\boxed{42}.",
    "Therefore the answer is 42.",
    "The final answer is: $42",
    "Answer: 42",
    "**Answer:** 42",
    "A: 42",
    "blah 3 then 17 then 42",
    "#### 42.00",
    "#### $42",
])
def test_formats_score_one(text):
    assert numeric_score(text, "42") == 1.0


def test_thousands_and_decimals():
    assert numeric_score("#### 1,234,567", "1234567") == 1.0
    assert numeric_score("The answer is $1,000.50.", "1000.5") == 1.0
    assert numeric_score("#### -3", "-3") == 1.0


@pytest.mark.parametrize("text", ["#### 43", "The answer is 4.2", "no number here", "#### 4 2"])
def test_wrong_answers_score_zero(text):
    assert numeric_score(text, "42") == 0.0


def test_first_matching_convention_wins_over_last_number():
    assert extract_final_answer("#### 12 and then some 99") == "12"


def test_strict_requires_hashes():
    assert numeric_score("the answer is 7", "7", strict=True) == 0.0
    assert numeric_score(" 3+4=7. #### 7", "7", strict=True) == 1.0


def test_gsm8k_ground_truth():
    assert gsm8k_ground_truth("She has 3 apples.\n#### 1,200") == "1200"
    assert gsm8k_ground_truth("no marker") is None


def test_registry_and_user_function():
    assert compute_score("synthetic_arith", " 1+1=2. #### 2", "2") == 1.0
    with pytest.raises(UserError, match="no reward function"):
        compute_score("unknown_source", "x", "1")
    fn = load_reward_function("resrl.rewards.numeric:numeric_score")
    assert fn("#### 5", "5") == 1.0
    with pytest.raises(UserError, match="cannot be loaded"):
        load_reward_function("no_such_module:fn")


def test_custom_reward_gets_extra_info_as_a_dict():
    from resrl.evaluation import score_samples

    seen = []

    def reward(data_source, solution_str, ground_truth, extra_info=None):
        seen.append(extra_info)
        return float(extra_info["level"] == 3)

    rows = [{"data_source": "x", "answer": "1", "extra_info": '{"level": 3}'}]
    scores, errors = score_samples(reward, rows, [[([1], "text")]])
    assert scores == [1.0] and errors == 0 and seen == [{"level": 3}]
