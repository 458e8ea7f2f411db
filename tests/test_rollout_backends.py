"""rollout.backend: the Hugging Face sampler returns the log-probs the trainer computes for the
same tokens, samples reproducibly per prompt seed whatever the batching, and runs a session step."""
import pytest
import torch

from resrl.batch import RolloutBatch
from resrl.config import load_config
from resrl.metrics import sampler_agreement
from resrl.rollout import HFRolloutEngine, resolve_backend
from resrl.trainer import PolicyTrainer

PROMPTS = [[5, 17, 33, 2], [100, 7], [64, 65, 66, 67, 68, 9], [12, 200, 31]]


@pytest.fixture(scope="module")
def hf_engine(micro_model):
    return HFRolloutEngine(str(micro_model), dtype="float32", device="cpu", max_num_seqs=256)


def sample(engine, prompts=PROMPTS, **kw):
    args = dict(n=4, temperature=0.7, top_p=1.0, top_k=-1, max_tokens=12, seed=11, logprobs=True)
    return engine.generate(prompts, **{**args, **kw})


def test_backend_choice():
    assert resolve_backend("auto", "cuda") == "vllm"
    assert resolve_backend("hf", "cuda") == "hf" and resolve_backend("vllm", "cpu") == "vllm"
    with pytest.raises(ValueError, match="rollout backend"):
        resolve_backend("sglang", "cpu")


def test_hf_logprobs_equal_the_trainers_recomputation(hf_engine, micro_model):
    outs = sample(hf_engine)
    prompts, responses, logps, gids = [], [], [], []
    for g, (p, samples) in enumerate(zip(PROMPTS, outs)):
        for ids, _, lp in samples:
            prompts.append(p)
            responses.append(ids)
            logps.append(lp)
            gids.append(g)
            assert len(ids) == len(lp) >= 1
    scores = torch.zeros(len(responses))
    batch = RolloutBatch(prompts, responses, scores, scores, torch.tensor(gids), sampler_logp=logps)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.n=4", "trainer.device=cpu", "rollout.temperature=0.7",
                             "algorithm.name=grpo", "algorithm.diagnostics=false", "trainer.mini_batches=1"])
    trainer = PolicyTrainer(str(micro_model), cfg, rollout_batch_size=len(batch))
    gap = sampler_agreement(trainer.score(batch).logp, batch.sampler_logp_tensor(), batch.response_mask())
    assert gap["sampler_logp_diff_max"] < 1e-4, gap
    # and the samples are samples, not the greedy path: a prompt's 4 samples are not all equal
    assert any(len({tuple(ids) for ids, _, _ in samples}) > 1 for samples in outs)


def same_samples(a, b):
    """Equal tokens; log-probs equal up to float noise (another padding width changes the sums' order)."""
    assert [[ids for ids, _, _ in p] for p in a] == [[ids for ids, _, _ in p] for p in b]
    for pa, pb in zip(a, b):
        for (_, _, la), (_, _, lb) in zip(pa, pb):
            assert la == pytest.approx(lb, abs=1e-5)


def test_hf_samples_depend_on_the_prompt_seed_not_on_batching(hf_engine):
    whole = sample(hf_engine)
    for i in range(len(PROMPTS)):  # prompt i samples with seed + i in any batch
        same_samples(sample(hf_engine, prompts=PROMPTS[i:i + 1], seed=11 + i), whole[i:i + 1])
    chunked = HFRolloutEngine.__new__(HFRolloutEngine)
    chunked.__dict__.update(hf_engine.__dict__, max_num_seqs=4)  # one prompt per generate call
    same_samples(sample(chunked), whole)
    other = sample(hf_engine, seed=12)
    assert [ids for ids, _, _ in other[0]] != [ids for ids, _, _ in whole[0]]


def test_hf_top_k_one_is_greedy_with_log_prob_zero(hf_engine):
    greedy = sample(hf_engine, temperature=0.0, n=1)
    top1 = sample(hf_engine, top_k=1, n=2)
    for g, t in zip(greedy, top1):
        assert t[0][0] == t[1][0] == g[0][0]  # the only token top-k keeps is the argmax
        assert all(x == 0.0 for x in t[0][2])  # log-prob after top-k: the one kept token has probability 1


def test_session_step_with_the_hf_backend(workdir, smoke_prepared):
    """A step's rollout and update on the hf backend; after the update the sampler holds the new
    weights (its log-probs of fresh samples agree with the trainer's)."""
    from pathlib import Path

    from conftest import ROOT, smoke_overrides
    from resrl.session import TrainingSession

    cfg = load_config(ROOT / "conf" / "smoke.yaml", smoke_overrides(Path(workdir)) + [
        "rollout.backend=hf", "algorithm.diagnostics_every=1000"])
    s = TrainingSession(cfg, smoke_prepared, smoke_prepared["policy_dir"], None)
    try:
        assert isinstance(s.engine, HFRolloutEngine)
        batch, metrics = s.rollout(1)
        assert len(batch) == cfg.rollout.prompts_per_step * cfg.rollout.n
        assert 0 < metrics["train/pass_rate"] < 1
        update = s.update(1, RolloutBatch.load(batch.save(Path(workdir) / "hf-step-1.safetensors")))  # as the flow
        assert update["train/sampler_logp_diff_max"] < 1e-4  # before the update: the same weights
        assert update["train/old_logp_from_sampler"] == 0.0  # the first update scores, and checks the sampler
        fresh, _ = s.rollout(2)
        gap = sampler_agreement(s.trainer.score(fresh).logp, fresh.sampler_logp_tensor(), fresh.response_mask())
        assert gap["sampler_logp_diff_max"] < 1e-4, gap  # the update reached the sampler
        # trainer.sampler_scores: from the second update on, the sampler's record replaces the scoring pass
        second = s.update(2, RolloutBatch.load(fresh.save(Path(workdir) / "hf-step-2.safetensors")))
        assert second["train/old_logp_from_sampler"] == 1.0 and "train/sampler_logp_diff_max" not in second
        assert s._sampled is None  # used once
    finally:
        s.close()


def test_hf_ignores_the_model_folders_generation_settings(micro_model, tmp_path):
    """generate() would fill its config from the folder's generation_config.json: a repetition
    penalty there would change the distribution sampled from, and the log-probs with it."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = tmp_path / "penalized"
    shutil.copytree(micro_model, folder)
    GenerationConfig(repetition_penalty=3.0, eos_token_id=0).save_pretrained(folder)
    engine = HFRolloutEngine(str(folder), dtype="float32", device="cpu", max_num_seqs=64)
    prompt = [5, 6, 7, 5, 6, 7]
    ids, _, logp = engine.generate([prompt], n=1, temperature=0.8, top_p=1.0, top_k=-1, max_tokens=10, seed=1,
                                   logprobs=True)[0][0]
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1] / 0.8
    want = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    assert float((want - torch.tensor(logp)).abs().max()) < 1e-5


def test_hf_preallocated_cache_samples_as_the_plain_cache(hf_engine, monkeypatch):
    """The cache written in place gives the tokens, log-probs and states a plain DynamicCache gives, bit for bit."""
    from transformers import DynamicCache

    import resrl.rollout

    def run():
        return hf_engine.generate_with_states(PROMPTS, n=4, temperature=0.7, top_p=1.0, top_k=-1, max_tokens=12,
                                              seed=11, logprobs=True, hidden_layer=-2)

    built = []
    real = resrl.rollout.preallocated_cache
    monkeypatch.setattr(resrl.rollout, "preallocated_cache", lambda *a: built.append(real(*a)) or built[-1])
    fast, fast_states = run()
    assert built and built[-1].layers[0].filled == max(len(p) for p in PROMPTS) + max(
        len(ids) for samples in fast for ids, _, _ in samples) - 1  # it was the cache generate wrote into
    monkeypatch.setattr(resrl.rollout, "preallocated_cache", lambda *a: DynamicCache())
    plain, plain_states = run()
    assert fast == plain
    for fs, ps in zip(fast_states, plain_states):
        assert all(torch.equal(f, p) for f, p in zip(fs, ps))


def test_preallocated_cache_layer_keeps_every_token_past_its_capacity():
    from resrl.rollout import preallocated_cache

    cache = preallocated_cache(1, 3)
    chunks = [torch.randn(2, 2, n, 4) for n in (2, 1, 1, 3)]  # 7 positions into a capacity of 3
    for c in chunks:
        keys, values = cache.layers[0].update(c, -c)
    assert torch.equal(keys, torch.cat(chunks, dim=-2)) and torch.equal(values, -torch.cat(chunks, dim=-2))
    assert cache.get_seq_length() == 7
