"""The study report's statistics against hand-computed cases: Holm's step-down adjustment,
the paired t-test, the learning-curve area, and which comparisons count as primary."""
import math

import pandas as pd
import pytest

from resrl.report import comparisons, curve_area, holm, paired_p_value, write_report


def test_holm_by_hand():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, kept monotone), 0.5 (x1)
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    out = holm([math.nan, 0.01])
    assert math.isnan(out[0]) and out[1] == pytest.approx(0.01)


def test_paired_p_value_against_the_t_distribution():
    from scipy.stats import t

    d = [0.1, 0.3, 0.2, 0.4]
    mean, sd = sum(d) / 4, math.sqrt(sum((x - 0.25) ** 2 for x in d) / 3)
    want = 2 * t.sf(mean / (sd / 2), 3)
    assert paired_p_value(d) == pytest.approx(want)
    assert math.isnan(paired_p_value([0.1]))


def test_curve_area_by_hand():
    # steps 0, 10, 30 with values 0, 1, 1: trapezoids 10 * 0.5 + 20 * 1 = 25 over a span of 30
    assert curve_area({0: 0.0, 10: 1.0, 30: 1.0}) == pytest.approx(25 / 30)
    assert curve_area({5: 0.4}) == 0.4 and math.isnan(curve_area({}))
    # a faster riser with the same end scores higher
    assert curve_area({0: 0.2, 10: 0.8, 20: 0.8}) > curve_area({0: 0.2, 10: 0.3, 20: 0.8})


def _runs():
    rows = []
    for seed, (a, b, c) in enumerate([(0.50, 0.40, 0.45), (0.60, 0.45, 0.58), (0.55, 0.47, 0.52)]):
        for name, v in (("resrl", a), ("nsr", b), ("grpo", c)):
            rows.append({"run_name": f"{name}{seed}", "status": "finished", "algorithm.name": name, "seed": seed,
                         "eval/avg_at_8": v, "eval/pass_at_8": v + 0.3})
    return pd.DataFrame(rows)


def test_comparisons_primary_uncorrected_and_the_rest_holm_corrected():
    primary = [{"config": {"algorithm.name": "nsr"}, "metric": "eval/avg_at_8"}]
    t = comparisons(_runs(), ["algorithm.name"], {"algorithm.name": "resrl"}, ["eval/avg_at_8", "eval/pass_at_8"],
                    primary)
    row = t[(t["algorithm.name"] == "nsr") & (t["metric"] == "eval/avg_at_8")].iloc[0]
    assert bool(row["primary"]) and math.isnan(row["p_holm"])
    assert row["diff"] == pytest.approx((0.10 + 0.15 + 0.08) / 3)  # resrl minus nsr, per seed
    assert row["p"] == pytest.approx(paired_p_value([0.10, 0.15, 0.08]))
    rest = t[~t["primary"]]
    assert len(rest) == 3
    assert list(rest["p_holm"]) == pytest.approx(holm(list(rest["p"])))


def test_report_lists_the_tests(tmp_path):
    files = write_report(_runs(), tmp_path, sweep_id="s", group_keys=["algorithm.name"], headline="eval/avg_at_8",
                         heatmap=[], reference={"algorithm.name": "resrl"},
                         primary=[{"config": {"algorithm.name": "grpo"}, "metric": "eval/pass_at_8"}])
    md = files["markdown"].read_text()
    assert "## Tests: name=resrl minus each configuration" in md
    assert "| grpo | eval/pass_at_8 | 3 |" in md and "| yes |" in md


def test_the_tests_count_avg_at_k_and_pass_at_1_once(tmp_path):
    # Avg@k and Pass@1 are the same number at an evaluation; counted twice, they would enlarge the Holm family
    runs = _runs()
    runs["eval/pass_at_1"] = runs["eval/avg_at_8"]
    files = write_report(runs, tmp_path, sweep_id="s", group_keys=["algorithm.name"], headline="eval/avg_at_8",
                         heatmap=[], reference={"algorithm.name": "resrl"}, primary=[])
    tests = pd.read_csv(files["tests"])
    assert set(tests["metric"]) == {"eval/avg_at_8", "eval/pass_at_8"}
    assert len(tests) == 4  # 2 configurations x 2 metrics
    assert "| eval/pass_at_1 | 3 |" not in files["markdown"].read_text()  # nor in the tests' table
