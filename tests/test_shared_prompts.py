"""trainer.share_prompts: each distinct prompt's forward runs once and its rows read its keys and
values. Checked against the packed forward (one sequence per row, prompt and response together):
log-probs, hidden states and gradients equal to float rounding, fewer tokens run, and a whole
update (all six algorithms, two mini-batches, diagnostics) equal to the packed update."""
import pytest
import torch

from resrl.batch import RolloutBatch, pack
from resrl.config import load_config
from resrl.hidden_states import capture_hidden
from resrl.shared_prompts import forward_rows, tokens_run, worth_sharing
from resrl.trainer import PolicyTrainer

PAD = 0


def grouped_rows(seed=0, vocab=250):
    """Groups of rows that share a prompt (lengths 1 to 9: a one-token prompt has nothing to share),
    responses of 0 to 10 tokens, and two groups with the same prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids = [], [], []
    lengths = [1, 9, 4, 6, 6]
    group_prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    group_prompts[4] = list(group_prompts[3])  # another group asking the same prompt
    for grp, p in enumerate(group_prompts):
        for _ in range(4):
            prompts.append(p)
            responses.append(torch.randint(1, vocab, (int(torch.randint(0, 11, (1,), generator=g)),),
                                           generator=g).tolist())
            gids.append(grp)
    responses[5] = []  # an empty response: nothing to score, still a row
    return prompts, responses, gids


def plain_forward(model, prompts, responses, layer):
    """The packed layout, written out: log-probs of the response tokens and the states that produced them."""
    packed = pack(prompts, responses, PAD)
    P, T = packed["prompt_width"], packed["response_mask"].shape[1]
    out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                position_ids=packed["position_ids"], output_hidden_states=True)
    logp = out.logits[:, P - 1:P + T - 1].log_softmax(-1).gather(-1, packed["input_ids"][:, P:, None]).squeeze(-1)
    mask = packed["response_mask"]
    return logp * mask, out.hidden_states[layer][:, P - 1:P + T - 1] * mask[..., None], mask


def shared_forward(model, prompts, responses, layer):
    with capture_hidden(model, layer) as box:
        out = forward_rows(model, prompts, responses, PAD, "cpu", share_prompts=True)
    T = out.mask.shape[1]
    logp = out.logits[:, :T].log_softmax(-1).gather(-1, out.targets[..., None]).squeeze(-1)
    return logp * out.mask, box["h"][:, out.state_offset:out.state_offset + T] * out.mask[..., None], out.mask


def test_shared_prompt_forward_equals_the_packed_one(micro_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    prompts, responses, _ = grouped_rows()
    assert worth_sharing(prompts, responses)
    results = {}
    for name, fn in (("packed", plain_forward), ("shared", shared_forward)):
        model.zero_grad()
        logp, hidden, mask = fn(model, prompts, responses, 2)
        # a loss that reads both the log-probs and the states, so both paths' gradients are compared
        (logp.sum() + 0.1 * hidden.square().sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[name] = (logp.detach(), hidden.detach(), mask, grads)
    (lp0, h0, m0, g0), (lp1, h1, m1, g1) = results["packed"], results["shared"]
    assert torch.equal(m0, m1)
    assert m0.sum() > 0 and (~m0[:, 0]).any()  # real responses, and an empty one
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    assert g0.norm() > 0
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5


def test_shared_prompt_forward_runs_fewer_tokens(micro_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    prompts, responses, _ = grouped_rows(seed=1)
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    with torch.no_grad():
        for share in (False, True):
            seen.clear()
            forward_rows(model, prompts, responses, PAD, "cpu", share_prompts=share)
            assert sum(seen) == tokens_run(prompts, responses, share)
    handle.remove()
    assert tokens_run(prompts, responses, True) < 0.8 * tokens_run(prompts, responses, False)
    # nothing to share: every prompt distinct, or one token long -> the packed layout
    assert not worth_sharing([[1, 2, 3], [4, 5, 6]], [[7], [8]])
    assert not worth_sharing([[1], [1]], [[7, 8], [8]])


def make_batch(seed=0) -> RolloutBatch:
    prompts, responses, gids = grouped_rows(seed)
    scores = torch.tensor([float((i * 7 + seed) % 3 == 0) for i in range(len(prompts))])
    return RolloutBatch(prompts, responses, scores.clone(), scores, torch.tensor(gids))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "resrl"])
def test_update_with_shared_prompts_equals_the_packed_update(micro_model, name):
    """Two mini-batches (the scoring pass, micro-batches of shuffled rows regrouped by prompt) and
    the displacement diagnostics: every metric and the new weights as with the packed forward."""
    batch = make_batch(seed=2)

    def trainer(share):
        cfg = load_config(None, ["rollout.prompts_per_step=5", "rollout.n=4", "trainer.device=cpu", "trainer.lr=1e-3",
                                 "trainer.warmup_steps=1", "algorithm.rank=3", f"algorithm.name={name}",
                                 "trainer.mini_batches=2", "trainer.micro_batch_size=6", "algorithm.diagnostics_every=1",
                                 f"trainer.share_prompts={share}"])
        return PolicyTrainer(str(micro_model), cfg, rollout_batch_size=len(batch))

    packed, shared = trainer("false"), trainer("true")
    assert shared._share_prompts and not packed._share_prompts
    want, got = packed.train_step(batch, 1), shared.train_step(batch, 1)
    assert set(got) == set(want) and {"loss", "grad_norm", "adv/mean"} <= set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    after = dict(packed.named_weights())
    for k, v in shared.named_weights():  # two Adam steps at lr 1e-3: 3e-5 is 1 % of them
        torch.testing.assert_close(v, after[k], atol=3e-5, rtol=1e-5)
