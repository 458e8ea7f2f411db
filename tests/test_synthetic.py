"""The embedded tasks: worked solutions by hand, the demonstrations' flaw rates, the settings
the generator refuses, and the seed split (the base model, data and warm-start follow
`base_seed`; the RL `seed` changes none of them)."""
import re

import pytest

from resrl.config import load_config
from resrl.errors import ConfigError
from resrl.rewards import compute_score
from resrl.synthetic import generate_rows, is_hard, ordered_solution


def test_ordered_solutions_by_hand():
    assert ordered_solution([7, 2, 5, 1], "L")[0] == " 7+2=9, 9+5=14, 14+1=15. #### 15"
    assert ordered_solution([7, 2, 5, 1], "R")[0] == " 1+5=6, 6+2=8, 8+7=15. #### 15"
    assert ordered_solution([7, 2, 5, 1], "P")[0] == " 7+2=9, 5+1=6, 9+6=15. #### 15"
    assert ordered_solution([7, 2, 5, 1], "L", slip_step=1)[0] == " 7+2=9, 9+5=15, 15+1=16. #### 16"
    assert ordered_solution([7, 2, 5, 1], "P", slip_step=1)[0] == " 7+2=9, 5+1=7, 9+7=16. #### 16"
    assert ordered_solution([7, 2, 5, 1], "L", swaps=(True, False, True))[0] == " 2+7=9, 9+5=14, 1+14=15. #### 15"


@pytest.mark.parametrize("order", "LRP")
def test_every_order_is_right_and_every_slip_is_wrong(order):
    import random

    rng = random.Random(0)
    for _ in range(200):
        nums = [rng.randint(0, 9) for _ in range(4)]
        swaps = tuple(rng.random() < 0.5 for _ in range(3))
        text, value = ordered_solution(nums, order, swaps=swaps)
        assert value == sum(nums) and compute_score("synthetic_arith", text, str(sum(nums))) == 1.0
        slipped, wrong = ordered_solution(nums, order, slip_step=1, swaps=swaps)
        assert wrong == sum(nums) + 1 and compute_score("synthetic_arith", slipped, str(sum(nums))) == 0.0


def test_orders_demonstrations_flaw_rates_and_hard_prompts():
    s = load_config(None, ["data.synthetic.num_train=3000", "data.synthetic.num_test=100",
                           "data.synthetic.orders=L"]).data.synthetic
    rows = generate_rows(s, seed=0)
    ok = {True: [], False: []}
    for r in rows["train"]:
        nums = [int(x) for x in r["question"].rstrip("=?").split("+")]
        ok[is_hard(nums, s)].append(compute_score("synthetic_arith", r["solution"], r["answer"]) == 1.0)
    assert not any(ok[True]) and len(ok[True]) > 300           # hard prompts: always flawed ...
    for r in rows["train"]:                                     # ... where they add the last term (L: step 3)
        nums = [int(x) for x in r["question"].rstrip("=?").split("+")]
        steps = [tuple(map(int, re.split("[+=]", m))) for m in re.findall(r"\d+\+\d+=\d+", r["solution"])]
        wrong = [i for i, (x, y, z) in enumerate(steps) if x + y != z]
        if is_hard(nums, s):
            assert wrong == [2] and steps[2][1] == nums[-1], r
        else:
            assert wrong in ([], [1]), r
    assert abs(sum(ok[False]) / len(ok[False]) - (1 - s.flawed_fraction)) < 0.05
    assert {", ", "; "} <= {m for r in rows["train"] for m in re.findall(r"[,;] ", r["solution"])}
    for r in rows["test"]:                                      # held-out rows carry a correct solution
        assert compute_score("synthetic_arith", r["solution"], r["answer"]) == 1.0


def test_three_orders_in_the_demonstrations():
    s = load_config(None, ["data.synthetic.orders=LRP", "data.synthetic.num_train=300"]).data.synthetic
    starts = set()
    for r in generate_rows(s, seed=0)["train"]:
        nums = [int(x) for x in r["question"].rstrip("=?").split("+")]
        first = tuple(map(int, re.findall(r"\d+", r["solution"])[:2]))
        starts.add("R" if first == (nums[3], nums[2]) and nums[:2] != [nums[3], nums[2]] else "LP")
    assert starts == {"R", "LP"}


def test_chain_task_is_unchanged():
    """conf/chain.yaml reproduces the earlier testbed row for row (its cached warm-starts and results)."""
    s = load_config("conf/chain.yaml", []).data.synthetic
    rows = generate_rows(s, seed=0)
    # rows read off the generator before the orders task existed (git show f623d2b:resrl/synthetic.py)
    assert rows["test"][0]["question"] == "6+0+4+8=?"
    assert rows["train"][5]["solution"] == " 3+7=10, 10+5=15, 15+4=19. #### 19"
    flawed = [r for r in rows["train"] if compute_score("synthetic_arith", r["solution"], r["answer"]) == 0.0]
    assert all(r["solution"].count("=") == 2 for r in flawed)   # stopped one step early
    assert abs(len(flawed) / len(rows["train"]) - 0.5) < 0.05


@pytest.mark.parametrize("overrides, message", [
    (["data.synthetic.ops=+-"], "sums of four terms"),
    (["data.synthetic.min_terms=3"], "sums of four terms"),
    (["data.synthetic.flaw=skip_last"], "one of none, slip"),
    (["data.synthetic.orders=LX"], "distinct letters"),
    (["data.synthetic.task=chain"], "one of none, skip_last"),
    (["data.synthetic.hard_last_operand=11"], "hard_last_operand"),
    (["data.synthetic.task=tree"], "one of orders, chain"),
])
def test_bad_task_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_rl_seed_does_not_change_the_base_model_data_or_warm_start_keys(tmp_path):
    from resrl.prepare import prepare_base_and_data

    common = [f"run.cache_dir={tmp_path}", "data.synthetic.num_train=64", "data.synthetic.num_test=16",
              "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1"]
    a = prepare_base_and_data(load_config(None, common + ["seed=0"]))
    b = prepare_base_and_data(load_config(None, common + ["seed=7"]))
    assert (a["base_dir"], a["dataset_dir"]) == (b["base_dir"], b["dataset_dir"]) and b["data_reused"]
    c = prepare_base_and_data(load_config(None, common + ["seed=0", "base_seed=1"]))
    assert c["base_dir"] != a["base_dir"] and c["dataset_dir"] != a["dataset_dir"]


def test_a_new_generator_version_is_a_new_dataset(tmp_path, monkeypatch):
    """Changed generator code with an unchanged config must not reuse the cached rows (nor the
    warm-start trained on them)."""
    import resrl.synthetic
    from resrl.prepare import prepare_base_and_data

    cfg = load_config(None, [f"run.cache_dir={tmp_path}", "data.synthetic.num_train=64", "data.synthetic.num_test=16",
                             "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1"])
    a = prepare_base_and_data(cfg)
    monkeypatch.setattr(resrl.synthetic, "VERSION", resrl.synthetic.VERSION + 1)
    b = prepare_base_and_data(cfg)
    assert b["dataset_dir"] != a["dataset_dir"] and not b["data_reused"]
