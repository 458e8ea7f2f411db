"""Displacement diagnostics: token classes by hand, per-response change by hand, and the
first-order interference estimate against a finite difference on the micro model."""
import math

import torch

from resrl.displacement import (AFTER, FIRST_DIVERGENT, NONE, SHARED, interference, token_classes,
                                update_displacement, weights_by_class)
from resrl.batch import RolloutBatch


def test_token_classes_by_hand():
    responses = [[5, 6, 7, 8],     # positive
                 [5, 6, 9, 9, 9],  # negative: shares 2 tokens with row 0
                 [4, 4],           # negative: shares nothing
                 [1, 2],           # a group with positives only
                 [1, 2, 3]]
    correct = torch.tensor([True, False, False, True, True])
    groups = torch.tensor([0, 0, 0, 1, 1])
    c = token_classes(responses, correct, groups, width=5)
    S, F, A, N = SHARED, FIRST_DIVERGENT, AFTER, NONE
    assert c.tolist() == [[S, S, F, A, N],   # the positive: its prefix shared with negative 1 is 2 tokens
                          [S, S, F, A, A],
                          [F, A, N, N, N],
                          [N, N, N, N, N],
                          [N, N, N, N, N]]


def test_a_negative_identical_to_a_prefix_of_a_positive_is_all_shared():
    c = token_classes([[1, 2, 3], [1, 2]], torch.tensor([True, False]), torch.tensor([0, 0]), width=3)
    assert c[1].tolist() == [SHARED, SHARED, NONE]
    assert c[0].tolist() == [SHARED, SHARED, FIRST_DIVERGENT]


def test_update_displacement_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    new = torch.tensor([[-1.5, -1.0, -0.5], [-2.5, -2.0, 0.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]).bool()
    classes = torch.tensor([[SHARED, FIRST_DIVERGENT, AFTER], [SHARED, SHARED, NONE], [NONE] * 3])
    positive = torch.tensor([True, True, False])
    m = update_displacement(old, new, mask.float(), classes, positive)
    # sequence changes: row 0: -0.5 + 0 + 0.5 = 0; row 1: -0.5 + 0 = -0.5 (row 2 is negative)
    assert math.isclose(m["disp/seq_logp_change"], -0.25)
    assert math.isclose(m["disp/frac_pos_down"], 0.5)
    # shared tokens: row 0 token 0 (-0.5), row 1 tokens 0-1 (-0.5)
    assert math.isclose(m["disp/shared_logp_change"], -0.5)
    assert math.isclose(m["lld"], -0.5 / 5, rel_tol=1e-6)  # per token over the positives' 5 tokens
    assert update_displacement(old, new, mask.float(), classes, torch.zeros(3, dtype=torch.bool)) == {}


def test_weights_by_class_uses_negatives_only():
    w = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.2, 0.2]])
    classes = torch.tensor([[SHARED, FIRST_DIVERGENT, AFTER], [SHARED, SHARED, AFTER]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    m = weights_by_class(w, classes, mask, torch.tensor([True, False]))
    want = {"resrl/weight_shared": 0.1, "resrl/weight_first_divergent": 0.5, "resrl/weight_after": 0.9}
    assert set(m) == set(want) and all(math.isclose(m[k], v, rel_tol=1e-6) for k, v in want.items())


def test_interference_is_the_directional_derivative():
    neg = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]   # |g| = 5
    pos = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0])]
    m = interference(neg, pos)
    # a step along -neg: d/ds of the positives' log-prob = -(neg . pos) / |neg| = -(3 - 4) / 5
    assert math.isclose(m["disp/neg_interference"], 0.2)
    assert math.isclose(m["disp/neg_interference_cos"], 0.2 / math.sqrt(6))
    assert interference([torch.zeros(2)], [torch.ones(2)]) == {}


def _shared_prefix_batch(vocab=250) -> RolloutBatch:
    g = torch.Generator().manual_seed(11)
    prompts, responses, scores, gids = [], [], [], []
    for grp in range(3):
        prompt = torch.randint(0, vocab, (5,), generator=g).tolist()
        stem = torch.randint(0, vocab, (4,), generator=g).tolist()
        for i in range(4):
            tail = torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            prompts.append(prompt)
            responses.append(stem + tail)  # every answer of a group shares its first 4 tokens
            scores.append(float(i % 2 == 0))
            gids.append(grp)
    s = torch.tensor(scores)
    return RolloutBatch(prompts, responses, s.clone(), s, torch.tensor(gids))


def test_negative_interference_matches_a_finite_difference(micro_model):
    """Move the weights a small step along the negative part's descent direction and measure the
    positives' mean sequence log-prob: the change per unit step is what the trainer reports."""
    from test_trainer import trainer_for

    for name in ("nsr", "resrl"):
        t = trainer_for(micro_model, f"algorithm.name={name}", "rollout.prompts_per_step=3", "rollout.n=4",
                        "trainer.mini_batches=1")
        batch = _shared_prefix_batch()
        scored = t.score(batch)
        adv = t.advantages(batch, scored)
        rows = (adv != 0).any(dim=1).nonzero().flatten() if t.algorithm.skip_zero_advantage \
            else torch.arange(len(batch))
        got = t.negative_interference(batch, rows, adv, "token-mean")
        assert set(got) == {"disp/neg_interference", "disp/neg_interference_cos"}

        # the direction, recomputed independently: loss = -sum(coef * adv * logp) over negative tokens
        module = t.engine.module
        params = [p for p in module.parameters() if p.requires_grad]
        mask = batch.response_mask()
        coef = torch.zeros(mask.shape)
        coef[rows] = mask[rows].float() / mask[rows].sum()
        neg = (coef * adv).clamp(max=0.0)
        logp, _, _, _ = t._forward(module, batch, torch.arange(len(batch)))
        loss = -(logp * neg[:, :logp.shape[1]]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        pos = batch.correct.nonzero().flatten()

        def pos_mean_logp():
            with torch.no_grad():
                lp, _, m, _ = t._forward(module, batch, pos)
                return float((lp * m).sum()) / len(pos)

        eps = 1e-3
        base = pos_mean_logp()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= eps * (g / norm).to(p.dtype)
        moved = pos_mean_logp()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p += eps * (g / norm).to(p.dtype)
        fd = (moved - base) / eps
        assert abs(fd - got["disp/neg_interference"]) <= 0.05 * abs(fd) + 1e-3, (name, fd, got)
