"""Real data in: GSM8K files, MATH-style rows, verl parquet (and the round trip),
saved HF datasets, bad rows counted and reported, over-long prompts."""
import json
from pathlib import Path

import pandas as pd
import pytest

from resrl.config import ConfigError, load_config
from resrl.data import DataError, PrepSummary, adapt_split, adapted_splits, export_verl, load_prepared, \
    prepare_dataset
from resrl.rewards import compute_score
from resrl.rewards.numeric import gsm8k_ground_truth

GSM = Path(__file__).parent / "data" / "gsm8k"


def gsm_rows(split="train"):
    return [json.loads(line) for line in (GSM / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(micro_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_model)


def cfg_for(*overrides):
    return load_config(None, list(overrides))


def test_gsm8k_from_files(tmp_path, tokenizer):
    cfg = cfg_for("data.source=gsm8k", f"data.path={GSM}", "data.max_prompt_tokens=2048")
    summary = prepare_dataset(cfg, tokenizer, tmp_path / "ds")
    ds = load_prepared(tmp_path / "ds")
    assert len(ds["train"]) == 40 and len(ds["test"]) == 12 and not summary.skipped
    row = ds["train"][0]
    assert row["answer"] == "72" and row["data_source"] == "openai/gsm8k"
    assert row["prompt"] == cfg.data.prompt_template.format(question=gsm_rows()[0]["question"])
    # every gold answer scores 1 against itself through the registry, in GSM8K's own format
    for raw, prepared in zip(gsm_rows(), ds["train"]):
        assert compute_score(prepared["data_source"], raw["answer"], prepared["answer"]) == 1.0


FORMATS = ["#### {a}", "\\boxed{{{a}}}", "The answer is {a}.", "Answer: {a}", "**Answer:** {a}", "A: {a}",
           "so we get {a}"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_gold_answer_scores_one_in_each_format(fmt):
    for raw in gsm_rows() + gsm_rows("test"):
        gold = gsm8k_ground_truth(raw["answer"])
        assert compute_score("openai/gsm8k", "Some reasoning 12.\n" + fmt.format(a=gold), gold) == 1.0
        # with thousands separators where the number has them to give
        value = int(float(gold))
        if abs(value) >= 1000:
            assert compute_score("openai/gsm8k", fmt.format(a=f"{value:,}"), gold) == 1.0


def test_altered_answers_score_zero():
    for raw in gsm_rows():
        gold = gsm8k_ground_truth(raw["answer"])
        wrong = str(int(float(gold)) + 1)
        for fmt in FORMATS:
            assert compute_score("openai/gsm8k", fmt.format(a=wrong), gold) == 0.0


def test_thousands_separator_rows_exist_in_the_slice():
    assert any(abs(float(gsm8k_ground_truth(r["answer"]))) >= 1000 for r in gsm_rows() + gsm_rows("test"))


def test_math_style_adapter_boxed_and_answer_field():
    rows = [
        {"problem": "What is 1/2 + 1/4?", "solution": "We add: $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Simplify sqrt(8).", "answer": "2\\sqrt{2}", "solution": "..."},
        {"problem": "No answer here", "solution": "I don't know."},
        {"problem": "", "answer": "3"},
    ]
    s = PrepSummary()
    out = adapt_split(rows, "math", "train", s, max_bad=0.6)
    assert [r["answer"] for r in out] == ["\\frac{3}{4}", "2\\sqrt{2}"]
    assert s.skipped == {"unparseable_answer": 1, "empty_prompt": 1}


def test_bad_rows_are_counted_and_too_many_fail_with_an_example():
    rows = gsm_rows()[:10] + [{"question": "q"}, {"answer": "#### 3"}, {"question": "q", "answer": "no marker"}]
    s = PrepSummary()
    out = adapt_split(rows, "gsm8k", "train", s, max_bad=0.5)
    assert len(out) == 10
    assert s.skipped == {"missing_field:answer": 1, "missing_field:question": 1, "unparseable_answer": 1}
    with pytest.raises(DataError) as e:
        adapt_split(rows, "gsm8k", "train", PrepSummary(), max_bad=0.1)
    msg = str(e.value)
    assert "3 of 13" in msg and "question" in msg and "answer" in msg and "Example row" in msg
    assert "Expected fields: `question`, and `answer` = worked solution ending in '#### N'. Example row" in msg
    with pytest.raises(DataError) as e:
        adapt_split([{"prompt": "q"}], "verl", "train", PrepSummary(), max_bad=0.0)
    assert ("Expected fields: `prompt` (chat messages), `reward_model.ground_truth`, `data_source`, `extra_info`, "
            "optional `uid`. Example row (missing_field:reward_model.ground_truth)") in str(e.value)


def test_overlong_prompts_dropped_or_truncated(tmp_path, tokenizer):
    base = ["data.source=gsm8k", f"data.path={GSM}", "data.max_prompt_tokens=200"]
    dropped = prepare_dataset(cfg_for(*base), tokenizer, tmp_path / "a")
    assert dropped.skipped["overlong_prompt"] > 0
    assert dropped.kept["train"] + dropped.kept["test"] + dropped.skipped["overlong_prompt"] == 52
    kept = prepare_dataset(cfg_for(*base, "data.overlong_prompts=truncate"), tokenizer, tmp_path / "b")
    ds = load_prepared(tmp_path / "b")
    assert kept.truncated == dropped.skipped["overlong_prompt"] and len(ds["train"]) == 40
    assert max(len(x) for x in ds["train"]["prompt_token_ids"]) <= 200


def test_held_out_rows_are_picked_among_the_usable_ones(tmp_path, tokenizer):
    """One split in the file: the held-out rows come from the prompts that fit, so a slice of
    over-long prompts cannot leave the test split short or empty."""
    rows = gsm_rows()
    long = [{**r, "question": r["question"] * 40} for r in rows[:30]]  # far over the limit below
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long + rows[30:]))
    cfg = cfg_for("data.source=gsm8k", f"data.path={tmp_path / 'one.jsonl'}", "data.num_test=6",
                  "data.max_prompt_tokens=2048")
    summary = prepare_dataset(cfg, tokenizer, tmp_path / "ds")
    ds = load_prepared(tmp_path / "ds")
    assert summary.skipped["overlong_prompt"] == 30
    assert len(ds["test"]) == 6 and len(ds["train"]) == len(rows) - 30 - 6
    assert not set(ds["test"]["question"]) & set(ds["train"]["question"])
    assert max(len(x) for split in ("test", "train") for x in ds[split]["prompt_token_ids"]) <= 2048


def test_verl_parquet_round_trip(tmp_path, tokenizer):
    cfg = cfg_for("data.source=gsm8k", f"data.path={GSM}", "data.max_prompt_tokens=2048")
    prepare_dataset(cfg, tokenizer, tmp_path / "ours")
    paths = export_verl(tmp_path / "ours", tmp_path / "verl")
    frame = pd.read_parquet(paths["train"])
    assert list(frame.columns) >= ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert frame["reward_model"][0]["ground_truth"] == "72"
    # import the exported files again: every row comes back with the same content
    cfg2 = cfg_for("data.source=verl", f"data.path={tmp_path / 'verl'}", "data.max_prompt_tokens=2048")
    prepare_dataset(cfg2, tokenizer, tmp_path / "back")
    a, b = load_prepared(tmp_path / "ours"), load_prepared(tmp_path / "back")
    for split in ("train", "test"):
        assert len(a[split]) == len(b[split])
        for x, y in zip(a[split], b[split]):
            assert (x["question"], x["answer"], x["data_source"], x["prompt_id"], x["prompt"]) == \
                   (y["question"], y["answer"], y["data_source"], y["prompt_id"], y["prompt"])


def test_an_unregistered_data_source_is_refused_after_preparation(tmp_path, tokenizer):
    """Before the warm-start and the engines (it used to fail at the first rollout's scoring)."""
    from resrl.prepare import check_reward_sources

    cfg = cfg_for("data.source=gsm8k", f"data.path={GSM}", "data.max_prompt_tokens=2048")
    prepare_dataset(cfg, tokenizer, tmp_path / "ours")
    paths = export_verl(tmp_path / "ours", tmp_path / "verl")
    frame = pd.read_parquet(paths["test"])
    frame.loc[0, "data_source"] = "my_lab/puzzles"
    frame.to_parquet(paths["test"])
    cfg2 = cfg_for("data.source=verl", f"data.path={tmp_path / 'verl'}", "data.max_prompt_tokens=2048")
    prepare_dataset(cfg2, tokenizer, tmp_path / "back")
    with pytest.raises(ConfigError, match="no reward function registered for data_source 'my_lab/puzzles'"):
        check_reward_sources(cfg2.reward, tmp_path / "back")
    own = cfg_for("data.source=verl", f"data.path={tmp_path / 'verl'}", "reward.function=resrl.rewards:compute_score")
    check_reward_sources(own.reward, tmp_path / "back")  # a reward.function of one's own decides for itself
    check_reward_sources(cfg.reward, tmp_path / "ours")


def test_verl_rows_with_chat_template(tmp_path, tokenizer):
    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "2+2?"}],
             "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": {"index": 0}}] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = cfg_for("data.source=verl", f"data.path={tmp_path / 'train.parquet'}", "data.num_test=1",
                  "data.use_chat_template=true")
    prepare_dataset(cfg, tokenizer, tmp_path / "ds")
    ds = load_prepared(tmp_path / "ds")
    assert len(ds["train"]) == 2 and len(ds["test"]) == 1
    assert ds["train"][0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert ds["train"][0]["prompt"].endswith("<|im_start|>assistant\n")


def test_saved_hf_dataset_and_single_file_need_a_holdout(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(gsm_rows()), "test": Dataset.from_list(gsm_rows("test"))}) \
        .save_to_disk(str(tmp_path / "saved"))
    s = PrepSummary()
    splits = adapted_splits(cfg_for("data.source=gsm8k", f"data.path={tmp_path / 'saved'}"), s)
    assert len(splits["train"]) == 40 and len(splits["test"]) == 12
    with pytest.raises(DataError, match="data.num_test"):
        adapted_splits(cfg_for("data.source=gsm8k", f"data.path={GSM / 'train.jsonl'}"), PrepSummary())


def test_missing_paths_and_unreachable_hub_are_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="does not exist"):
        adapted_splits(cfg_for("data.source=gsm8k", "data.path=./no/such/dir"), PrepSummary())
    with pytest.raises(DataError, match="someone/some-dataset"):
        adapted_splits(cfg_for("data.source=gsm8k", "data.path=someone/some-dataset"), PrepSummary())
    with pytest.raises(DataError, match="needs data.path"):
        adapted_splits(cfg_for("data.source=gsm8k"), PrepSummary())


def test_math_rows_with_numeric_answers_are_kept():
    s = PrepSummary()
    out = adapt_split([{"problem": "AIME-ish", "answer": 204}, {"problem": "x", "answer": 7.5}], "math", "train", s,
                      max_bad=0.0)
    assert [r["answer"] for r in out] == ["204", "7.5"] and not s.skipped
