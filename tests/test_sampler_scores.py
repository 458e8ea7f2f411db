"""trainer.sampler_scores: the Hugging Face sampler's log-probs and the hidden states it kept
while drawing a batch replace the trainer's no-grad scoring pass. Checked against that pass,
which stays the reference: the states are the trainer's, and a whole update - every metric and
the new weights - is the scoring-pass update's, for all six algorithms with two mini-batches."""
import pytest
import torch

from resrl.batch import RolloutBatch, SamplerStates
from resrl.config import load_config
from resrl.rollout import HFRolloutEngine
from resrl.trainer import SAMPLER_LOGP_TOL, PolicyTrainer

GROUPS, N, LAYER = 4, 4, -2
PROMPTS = [[5, 17, 33, 2], [100, 7], [64, 65, 66, 67, 68, 9], [12, 200, 31]]


@pytest.fixture(scope="module")
def drawn(micro_model):
    """A batch the hf sampler drew from the micro model (mixed groups, made up scores), with its record."""
    engine = HFRolloutEngine(str(micro_model), dtype="float32", device="cpu", max_num_seqs=256)
    outs, states = engine.generate_with_states(PROMPTS, n=N, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12,
                                               seed=5, logprobs=True, hidden_layer=LAYER)
    prompts, responses, logps, hidden, scores, gids = [], [], [], [], [], []
    for g, (p, samples) in enumerate(zip(PROMPTS, outs)):
        for i, (ids, _, lp) in enumerate(samples):
            assert len(ids) == len(lp) == states[g][i].shape[0] >= 1
            cut = 3 + (5 * i + g) % 10  # the untrained model rarely stops: ragged prefixes (a prefix's record is its own)
            prompts.append(p)
            responses.append(ids[:cut])
            logps.append(lp[:cut])
            hidden.append(states[g][i][:cut])
            scores.append(float((i + g) % 3 == 0))  # mixed groups, as tests/test_trainer.py's
            gids.append(g)
    assert len({len(r) for r in responses}) > 1  # ragged: padding is exercised
    s = torch.tensor(scores)
    batch = RolloutBatch(prompts, responses, s.clone(), s, torch.tensor(gids), sampler_logp=logps)
    return batch, SamplerStates(1, LAYER, hidden)


def trainer_for(model_dir, *overrides):
    cfg = load_config(None, [f"rollout.prompts_per_step={GROUPS}", f"rollout.n={N}", "trainer.device=cpu",
                             "trainer.lr=1e-3", "trainer.warmup_steps=1", "algorithm.rank=3",
                             f"algorithm.hidden_layer={LAYER}", "trainer.micro_batch_size=6",
                             "algorithm.diagnostics_every=1000", *overrides])
    return PolicyTrainer(str(model_dir), cfg, rollout_batch_size=GROUPS * N)


def test_the_samplers_states_are_the_trainers(drawn, micro_model):
    """Row t of a sample's record is the state the trainer's forward over the finished sequence
    gives at the position that predicts token t (KV-cached decoding vs one pass: float noise)."""
    batch, sampled = drawn
    trainer = trainer_for(micro_model)
    rows = torch.arange(len(batch))
    with torch.no_grad():
        _, _, mask, hidden = trainer._forward(trainer.engine.module, batch, rows, hidden_layer=LAYER)
    scale = float(hidden[mask].abs().mean())
    assert scale > 1e-3  # states, not zeros (an untrained model's are small: ~0.02)
    for r in range(len(batch)):
        n = len(batch.response_ids[r])
        torch.testing.assert_close(sampled.hidden[r], hidden[r, :n].float(), atol=1e-3 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "resrl"])
def test_the_sampler_scored_update_equals_the_scoring_pass_update(drawn, micro_model, name):
    """Two mini-batches (the default; the single pass does not apply): the same loss, gradient norm,
    token weights, advantages and new weights as with the scoring pass, which does not run."""
    batch, sampled = drawn
    args = (f"algorithm.name={name}", "trainer.mini_batches=2")
    reference = trainer_for(micro_model, *args, "trainer.sampler_scores=false")
    fast = trainer_for(micro_model, *args)
    assert reference.wants_sampler_states() is None
    assert fast.wants_sampler_states() == LAYER  # every algorithm logs ResRL's weights (algorithm.diagnostics)
    fast._sampler_agrees = True  # as after a first update's check (test below)
    assert fast.sampler_scores_apply(batch, sampled, diagnose=False)

    def no_scoring_pass(*a, **k):
        raise AssertionError("the scoring pass ran")

    fast.score = no_scoring_pass
    want, got = reference.train_step(batch, 1), fast.train_step(batch, 1, sampled)
    assert want["old_logp_from_sampler"] == 0.0 and got["old_logp_from_sampler"] == 1.0
    assert want["sampler_logp_diff_max"] < 1e-4  # the two sources agree (what the fast path relies on)
    agreement = {k for k in want if k.startswith("sampler_")}
    assert set(got) == set(want) - agreement and {"loss", "grad_norm", "resrl/weight_mean", "adv/mean"} <= set(got)
    for key, value in got.items():
        if key != "old_logp_from_sampler":
            assert value == pytest.approx(want[key], rel=1e-4, abs=1e-5, nan_ok=True), key
    after = dict(reference.named_weights())
    for k, v in fast.named_weights():  # two Adam steps at lr 1e-3, each ~lr * g / (|g| + eps): where |g| is
        # near eps float noise moves a weight by a fraction of lr; 3e-5 is 1.5 % of the two steps (1.7e-5 seen)
        torch.testing.assert_close(v, after[k], atol=3e-5, rtol=1e-5)


def test_the_sampler_stands_in_only_once_checked_and_where_it_can(drawn, micro_model):
    batch, sampled = drawn
    t = trainer_for(micro_model)
    assert not t.sampler_scores_apply(batch, sampled, diagnose=False)  # nothing checked yet
    first = t.train_step(batch, 1, sampled)  # a scoring pass, which checks the sampler's log-probs
    assert first["old_logp_from_sampler"] == 0.0 and first["sampler_logp_diff_max"] < SAMPLER_LOGP_TOL
    assert t.sampler_scores_apply(batch, sampled, diagnose=False)
    assert not t.sampler_scores_apply(batch, sampled, diagnose=True)  # diagnostics steps compare the two
    assert not t.sampler_scores_apply(batch, None, diagnose=False)  # a resumed step: no record
    partial = SamplerStates(1, LAYER, sampled.hidden[:-1] + [None])
    assert not t.sampler_scores_apply(batch, partial, diagnose=False)
    assert not t.sampler_scores_apply(batch, SamplerStates(1, -1, sampled.hidden), diagnose=False)  # another layer
    # a sampler off by more than the tolerance: the next scoring pass says so, and the pass stays
    off = RolloutBatch(batch.prompt_ids, batch.response_ids, batch.rewards, batch.scores, batch.group_ids,
                       sampler_logp=[[x - 10 * SAMPLER_LOGP_TOL for x in r] for r in batch.sampler_logp])
    with pytest.warns(RuntimeWarning, match="scoring pass again"):
        checked = t.train_step(off, 1000, sampled)  # step 1000: a diagnostics step, which scores
    assert checked["sampler_logp_diff_max"] > SAMPLER_LOGP_TOL
    assert not t.sampler_scores_apply(batch, sampled, diagnose=False)
    # settings where the sampler's log-probs are not the old ones, or the states not at hand
    for extra in ("rollout.top_p=0.9", "rollout.top_k=5", "loss.rollout_correction.mode=token_tis",
                  "loss.kl_coef=0.1", "trainer.sampler_scores=false"):
        other = trainer_for(micro_model, extra)
        other._sampler_agrees = True
        assert not other.sampler_scores_apply(batch, sampled, diagnose=False), extra
        assert other.wants_sampler_states() is None, extra
    # an algorithm without token weights needs the log-probs only
    grpo = trainer_for(micro_model, "algorithm.name=grpo", "algorithm.diagnostics=false")
    grpo._sampler_agrees = True
    assert grpo.wants_sampler_states() is None
    assert grpo.sampler_scores_apply(batch, SamplerStates(1, None, None), diagnose=False)
