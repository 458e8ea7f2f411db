"""Each workflow step on its own: data preparation, rollouts, the update (with the
weight sync into vLLM), and evaluation - on the smoke configuration's real engines."""
import math

import pytest
import torch

from resrl.data import load_prepared
from resrl.prepare import prepare
from resrl.rewards import compute_score
from resrl.metrics import sampler_agreement
from resrl.synthetic import generate_rows


def test_prepared_dataset(smoke_prepared, smoke_cfg):
    ds = load_prepared(smoke_prepared["dataset_dir"])
    assert len(ds["train"]) == smoke_cfg.data.synthetic.num_train
    assert len(ds["test"]) == smoke_cfg.data.synthetic.num_test
    for col in ("prompt", "prompt_token_ids", "answer", "data_source", "prompt_id"):
        assert col in ds["train"].column_names
    assert not set(ds["train"]["prompt"]) & set(ds["test"]["prompt"])
    assert len(set(ds["train"]["prompt_id"])) == len(ds["train"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smoke_prepared["policy_dir"])
    for row in ds["train"].select(range(20)):
        assert tok.decode(row["prompt_token_ids"]) == row["prompt"]
        # the verifier accepts a demonstration exactly when it ends on the expression's value
        # (an independent eval); the flawed ones (test below) end on another number
        right = row["solution"].endswith(f"#### {eval(row['prompt'].split('=?')[0].split()[-1])}")
        assert compute_score(row["data_source"], row["solution"], row["answer"]) == float(right)
        assert compute_score(row["data_source"], row["solution"].replace(f"#### {row['answer']}", "#### 99999"),
                             row["answer"]) == 0.0


def test_preparation_is_cached(smoke_cfg, smoke_prepared):
    again = prepare(smoke_cfg, progress=False)
    assert again["data_reused"] and again["warmstart_reused"]
    assert again["policy_dir"] == smoke_prepared["policy_dir"]
    assert again["seconds"] < 10


def test_synthetic_rows_are_deterministic(smoke_cfg):
    a = generate_rows(smoke_cfg.data.synthetic, seed=1)
    assert a == generate_rows(smoke_cfg.data.synthetic, seed=1)
    assert a != generate_rows(smoke_cfg.data.synthetic, seed=2)


def test_warmstart_demonstrations_mix_the_flawed_procedure(smoke_cfg):
    """Train demonstrations: the correct worked solution, or (flawed_fraction of them) the same
    opening steps with the last term left out; answers and held-out solutions always correct."""
    import re

    rows = generate_rows(smoke_cfg.data.synthetic, seed=0)
    flawed = 0
    for split in ("train", "test"):
        for row in rows[split]:
            expr = row["question"].removesuffix("=?")
            assert row["answer"] == str(eval(expr))  # an independent evaluation of the expression
            work, final = row["solution"].split(". #### ")
            steps = re.findall(r"(-?\d+)([+*-])(\d+)=(-?\d+)", work)
            assert all(eval(a + op + b) == int(c) for a, op, b, c in steps)  # every written step is right
            assert final == steps[-1][3]
            terms = len(re.findall(r"\d+", expr))
            if len(steps) == terms - 1:  # the whole procedure
                assert final == row["answer"]
            else:                        # the flawed one: stops one step early
                assert split == "train" and len(steps) == terms - 2 >= 1
                assert final == str(eval(re.sub(r"[+*-]\d+$", "", expr)))  # the value without the last term
                flawed += 1
    share = flawed / len(rows["train"])
    assert abs(share - smoke_cfg.data.synthetic.flawed_fraction) < 0.05


def test_rollouts(session, smoke_cfg):
    r = smoke_cfg.rollout
    batch, metrics = session.rollout(1)
    assert len(batch) == r.prompts_per_step * r.n
    assert torch.equal(torch.bincount(batch.group_ids), torch.full((r.prompts_per_step,), r.n))
    tok = session.trainer.tokenizer
    rows = [session.train_set[i] for i in session.prompt_indices(1)]
    for i in range(len(batch)):
        row = rows[int(batch.group_ids[i])]
        assert batch.prompt_ids[i] == row["prompt_token_ids"]
        resp = batch.response_ids[i]
        assert resp[-1] == tok.eos_token_id or len(resp) == r.max_tokens
        assert tok.decode(resp, skip_special_tokens=True) == batch.texts[i]
        assert float(batch.scores[i]) == compute_score(row["data_source"], batch.texts[i], row["answer"])
    assert metrics["train/pass_rate"] == pytest.approx(float(batch.correct.float().mean()))
    assert 0 < metrics["train/pass_rate"] < 1  # the warm-started policy gives both signs
    again, _ = session.rollout(1)
    assert again.response_ids == batch.response_ids  # per-prompt seeds: reproducible


def test_update_changes_weights_and_syncs_them_into_vllm(session):
    batch, _ = session.rollout(2)
    before = {k: v.clone() for k, v in session.trainer.named_weights()}
    metrics = session.update(2, batch)
    after = dict(session.trainer.named_weights())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("train/loss", "train/grad_norm", "train/entropy", "train/approx_kl", "train/lld"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["train/clip_frac"] <= 1
    assert 0.1 <= metrics["train/resrl/weight_min"] <= metrics["train/resrl/weight_mean"] <= 1
    assert metrics["train/sampler_logp_diff_max"] < 1e-3  # the batch was sampled from the trainer's policy
    fresh, _ = session.rollout(3)  # vLLM samples from the updated policy
    gap = sampler_agreement(session.trainer.score(fresh).logp, fresh.sampler_logp_tensor(), fresh.response_mask())
    assert gap["sampler_logp_diff_max"] < 1e-3


def test_evaluate(session, smoke_cfg):
    k = smoke_cfg.eval.k
    metrics, samples = session.evaluate(0)
    table = [metrics[f"eval/pass_at_{j}"] for j in (1, 2, 4)]
    assert all(0 <= v <= 1 for v in table) and table == sorted(table)
    assert metrics["eval/pass_at_1"] == pytest.approx(metrics[f"eval/avg_at_{k}"])
    assert len(samples) == min(smoke_cfg.eval.num_logged_samples, smoke_cfg.eval.num_prompts * k)
    for s in samples:
        assert s["correct"] == (compute_score("synthetic_arith", s["response"], s["answer"]) == 1.0)
    again, _ = session.evaluate(0)
    assert again["eval/pass_at_1"] == metrics["eval/pass_at_1"]  # a fixed eval seed: comparable across steps
