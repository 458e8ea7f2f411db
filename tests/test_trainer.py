"""The DeepSpeed trainer on a very small model: hidden-state capture, whole-group
ResRL weighting independent of micro-batching, exact micro-batch gradient
accumulation, and checkpoint round trips."""
import math

import pytest
import torch

from resrl.algorithms import residual_token_weights
from resrl.batch import RolloutBatch, pack
from resrl.checkpoint import policy_dir
from resrl.config import load_config
from resrl.trainer import PolicyTrainer, capture_hidden

GROUPS, N = 4, 4


def make_batch(seed=0, vocab=250) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, responses, scores, gids = [], [], [], []
    for grp in range(GROUPS):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(N):
            length = int(torch.randint(2, 12, (1,), generator=g))
            responses.append(torch.randint(0, vocab, (length,), generator=g).tolist())
            prompts.append(prompt)
            scores.append(float((i + grp) % 3 == 0))  # mixed groups, group 2 has one positive
            gids.append(grp)
    s = torch.tensor(scores)
    return RolloutBatch(prompts, responses, s.clone(), s, torch.tensor(gids))


def trainer_for(model_dir, *overrides):
    cfg = load_config(None, [f"rollout.prompts_per_step={GROUPS}", f"rollout.n={N}", "trainer.device=cpu",
                             "trainer.lr=1e-3", "trainer.warmup_steps=1", "algorithm.rank=3", *overrides])
    return PolicyTrainer(str(model_dir), cfg, rollout_batch_size=GROUPS * N)


def test_capture_hidden_matches_output_hidden_states(micro_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (-1, -2, 1, 2):
            with capture_hidden(model, layer) as box:
                model(input_ids=ids)
            torch.testing.assert_close(box["h"], ref[layer])
    with pytest.raises(ValueError, match="hidden_layer"):
        with capture_hidden(model, 7):
            pass


@pytest.fixture(scope="module")
def trainers(micro_model):
    """Same model and batch, micro-batch size 1, N (one group) and the whole batch."""
    return {mb: trainer_for(micro_model, f"trainer.micro_batch_size={mb}", "trainer.mini_batches=1")
            for mb in (1, N, GROUPS * N)}


def test_scoring_logprobs_match_a_plain_forward(trainers, micro_model):
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    scored = trainers[N].score(batch)
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    for i in (0, 5, 11):  # one sequence at a time, no padding at all
        ids = torch.tensor([batch.prompt_ids[i] + batch.response_ids[i]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        P = len(batch.prompt_ids[i])
        want = logits[P - 1:-1].log_softmax(-1).gather(-1, ids[0, P:, None]).squeeze(-1)
        torch.testing.assert_close(scored.logp[i, :len(want)], want, atol=1e-5, rtol=0)


def test_resrl_weights_independent_of_micro_batch_size(trainers):
    batch = make_batch()
    w = {mb: t.score(batch).token_weights for mb, t in trainers.items()}
    assert torch.any(w[N] != 1.0)
    torch.testing.assert_close(w[1], w[GROUPS * N], atol=1e-5, rtol=0)
    torch.testing.assert_close(w[N], w[GROUPS * N], atol=1e-5, rtol=0)


def test_trainer_weights_equal_public_function_on_whole_batch(trainers, micro_model):
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    t = trainers[N]
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    packed = pack(batch.prompt_ids, batch.response_ids, t.pad_id)
    P, T = packed["prompt_width"], packed["response_mask"].shape[1]
    with torch.no_grad():
        hs = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                   position_ids=packed["position_ids"], output_hidden_states=True).hidden_states[-2]
    a = t.cfg.algorithm
    want = residual_token_weights(hs[:, P - 1:P + T - 1], packed["response_mask"], batch.correct, batch.group_ids,
                                  rank=a.rank, q_low=a.q_low, q_high=a.q_high, min_weight=a.min_weight)
    torch.testing.assert_close(t.score(batch).token_weights, want, atol=1e-4, rtol=0)


def test_shuffled_batch_gives_permuted_weights(trainers):
    batch = make_batch()
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(1))
    w = trainers[N].score(batch).token_weights
    wp = trainers[N].score(batch.select(perm)).token_weights
    torch.testing.assert_close(wp[:, :w.shape[1]], w[perm], atol=1e-5, rtol=0)


def test_update_is_identical_for_any_micro_batch_size(micro_model):
    batch = make_batch(seed=3)
    after = []
    for mb in (1, 5, GROUPS * N):
        t = trainer_for(micro_model, f"trainer.micro_batch_size={mb}", "trainer.mini_batches=2",
                        "loss.agg=seq-mean-token-mean")
        before = {k: v.clone() for k, v in t.named_weights()}
        metrics = t.train_step(batch, step=1)
        assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k != "lld")
        after.append(dict(t.named_weights()))
    assert any(not torch.equal(before[k], after[0][k]) for k in before)
    for other in after[1:]:
        for k in after[0]:
            torch.testing.assert_close(other[k], after[0][k], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("zero", [0, 2])  # 2: DeepSpeed's own partitioned format (what bf16 on CUDA always uses)
def test_checkpoint_round_trip_resumes_exactly(zero, micro_model, tmp_path):
    b1, b2 = make_batch(seed=4), make_batch(seed=5)
    straight = trainer_for(micro_model, f"trainer.zero_stage={zero}")
    straight.train_step(b1, 1)
    straight.train_step(b2, 2)

    first = trainer_for(micro_model, f"trainer.zero_stage={zero}")
    first.train_step(b1, 1)
    first.save_checkpoint(tmp_path / "ck", 1)
    assert (policy_dir(tmp_path / "ck") / "model.safetensors").is_file()
    assert (tmp_path / "ck" / ("deepspeed" if zero else "optimizer.safetensors")).exists()
    resumed = trainer_for(policy_dir(tmp_path / "ck"), f"trainer.zero_stage={zero}")
    assert resumed.load_checkpoint(tmp_path / "ck") == 1
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    resumed.train_step(b2, 2)
    want = dict(straight.named_weights())
    for k, v in resumed.named_weights():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-5)


def test_nsr_pushes_negatives_down_and_psr_pulls_positives_up(micro_model):
    batch = make_batch(seed=6)
    for name, rows, sign in (("nsr", ~batch.correct, -1), ("psr", batch.correct, 1)):
        t = trainer_for(micro_model, f"algorithm.name={name}", "trainer.mini_batches=1", "trainer.lr=1e-3")
        before = t.score(batch).logp
        t.train_step(batch, 1)
        after = t.score(batch).logp
        mask = batch.response_mask()
        change = ((after - before) * mask)[rows].sum() / mask[rows].sum()
        assert sign * float(change) > 0


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "resrl"])
def test_every_algorithm_updates_through_the_same_trainer(micro_model, name):
    batch = make_batch(seed=7)
    t = trainer_for(micro_model, f"algorithm.name={name}", "trainer.mini_batches=1")
    before = {k: v.clone() for k, v in t.named_weights()}
    metrics = t.train_step(batch, step=1)
    assert all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("resrl/") and k != "lld")
    assert any(not torch.equal(before[k], v) for k, v in t.named_weights())
    assert 0.1 <= metrics["resrl/weight_mean"] <= 1 and 0 <= metrics["resrl/alignment"] <= 1  # logged for all
    scored = t.score(batch)
    seq = t.algorithm.advantages(batch.rewards, batch.correct, batch.group_ids, t.cfg.algorithm)
    applied = not torch.allclose(t.advantages(batch, scored), seq[:, None] * batch.response_mask())
    assert applied == (name == "resrl")  # only ResRL applies the token weights


@pytest.mark.parametrize("name, sign", [("psr", -1.0), ("nsr", 1.0)])
def test_psr_and_nsr_train_on_their_own_samples_only(micro_model, name, sign):
    """RLVR-Decomposed drops the other samples: the token mean runs over the kept samples only.
    On-policy (ratio 1) the loss is then exactly -1 (PSR) or +1 (NSR), whatever the pass rate,
    and the update equals one on the batch holding only those samples."""
    batch = make_batch(seed=8)
    own = batch.correct if name == "psr" else ~batch.correct
    assert 0 < int(own.sum()) < len(batch)
    full = trainer_for(micro_model, f"algorithm.name={name}", "trainer.mini_batches=1")
    metrics = full.train_step(batch, 1)
    assert metrics["update_samples"] == int(own.sum())
    assert metrics["loss"] == pytest.approx(sign, abs=1e-6)
    subset = trainer_for(micro_model, f"algorithm.name={name}", "trainer.mini_batches=1")
    subset.train_step(batch.select(own.nonzero().flatten()), 1)
    want = dict(subset.named_weights())
    for k, v in full.named_weights():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-5)
    grpo = trainer_for(micro_model, "algorithm.name=grpo", "trainer.mini_batches=1")
    assert grpo.train_step(batch, 1)["update_samples"] == len(batch)  # group algorithms keep every sample


def test_rollout_correction_reaches_the_update(micro_model):
    """The trainer hands the batch's sampler log-probs to the loss: a sampler that agrees with the
    trainer leaves the update as it is; one that disagrees changes it and is reported."""
    batch = make_batch(seed=9)
    args = ("algorithm.name=grpo", "trainer.mini_batches=1")
    logp = trainer_for(micro_model, *args).score(batch).logp

    def update(mode, sampler_logp):
        batch.sampler_logp = [sampler_logp[i, :len(r)].tolist() for i, r in enumerate(batch.response_ids)]
        t = trainer_for(micro_model, *args, f"loss.rollout_correction.mode={mode}")
        metrics = t.train_step(batch, 1)
        return dict(t.named_weights()), metrics

    plain, _ = update("none", logp)
    agreeing, metrics = update("token_tis", logp)
    assert metrics["rollout_corr/changed_frac"] == 0.0 and metrics["rollout_corr/weight_mean"] == pytest.approx(1.0)
    for k, v in agreeing.items():
        torch.testing.assert_close(v, plain[k], atol=1e-7, rtol=0)
    off = logp.clone()
    off[::2] -= 1.0  # every other sample: the sampler gave its tokens e^-1 of the trainer's probability
    assert update("none", off)[1]["sampler_ratio_max"] == pytest.approx(math.e, rel=1e-5)
    corrected, metrics = update("token_tis", off)
    assert metrics["rollout_corr/changed_frac"] > 0.3  # ratio e > cap 2 on those samples' tokens
    assert any(not torch.allclose(v, plain[k], atol=1e-6) for k, v in corrected.items())


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "resrl"])
def test_single_pass_update_equals_the_separate_scoring_pass(micro_model, name):
    """trainer.single_pass: with one on-policy pass the loss's own forward replaces the no-grad
    scoring pass. Same loss, gradient norm, token weights, advantages and new weights as the
    separate pass (its micro-batches are whole groups instead of shuffled rows: float tolerance),
    and the scoring pass really is not run."""
    batch = make_batch(seed=10)
    args = (f"algorithm.name={name}", "trainer.mini_batches=1", "trainer.micro_batch_size=5",
            "algorithm.diagnostics_every=1000")  # step 1 has no displacement diagnostics
    separate = trainer_for(micro_model, *args, "trainer.single_pass=false")
    single = trainer_for(micro_model, *args)
    assert single.single_pass_applies(diagnose=False) and not separate.single_pass_applies(diagnose=False)
    assert not single.single_pass_applies(diagnose=True)  # the diagnostics need the advantages before the update

    def no_scoring_pass(*a, **k):
        raise AssertionError("the scoring pass ran")

    single.score = no_scoring_pass
    want, got = separate.train_step(batch, 1), single.train_step(batch, 1)
    assert set(got) == set(want) and {"loss", "grad_norm", "resrl/weight_mean", "adv/mean"} <= set(want)
    for key, value in want.items():  # every metric of the step: loss, token sums, weights, advantages
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    after = dict(separate.named_weights())
    for k, v in single.named_weights():  # Adam's first step is ~lr * g / (|g| + eps): where |g| is near eps,
        # float noise in g moves a weight by a fraction of lr (1e-3); 1e-5 is 1 % of one step
        torch.testing.assert_close(v, after[k], atol=1e-5, rtol=1e-5)


def test_single_pass_keeps_the_separate_pass_where_it_cannot_replace_it(micro_model):
    batch = make_batch(seed=11)
    for extra in ("trainer.mini_batches=2", "trainer.epochs=2", "loss.kl_coef=0.1"):
        t = trainer_for(micro_model, extra, "algorithm.diagnostics_every=1000")
        assert not t.single_pass_applies(diagnose=False), extra
    t = trainer_for(micro_model, "trainer.mini_batches=1", "algorithm.diagnostics_every=1000")
    t._dropout = True  # a model that drops out trains on another forward than it scores with
    assert not t.single_pass_applies(diagnose=False)
    # the rollout correction reads the sampler's log-probs in the single pass too
    logp = t.score(batch).logp
    rows = [[float(x) for x in logp[i, :len(r)]] for i, r in enumerate(batch.response_ids)]
    skewed = RolloutBatch(batch.prompt_ids, batch.response_ids, batch.rewards, batch.correct, batch.group_ids,
                          sampler_logp=[[x - 0.7 for x in r] for r in rows])
    out = {}
    for sp in ("true", "false"):
        tt = trainer_for(micro_model, "trainer.mini_batches=1", "algorithm.diagnostics_every=1000",
                         "loss.rollout_correction.mode=token_tis", "loss.rollout_correction.cap=1.5",
                         f"trainer.single_pass={sp}")
        out[sp] = tt.train_step(skewed, 1)
    assert out["true"]["loss"] == pytest.approx(out["false"]["loss"], rel=1e-4)
    assert out["true"]["grad_norm"] == pytest.approx(out["false"]["grad_norm"], rel=1e-4)
