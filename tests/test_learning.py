"""RL that measurably learns, and the faults that must stop it from learning.

The warm-started embedded policy stops one step early in about half of its answers
(`data.synthetic.flaw=skip_last`); GRPO should lift the pass rate of its rollouts well
beyond the start within ten steps. The same run with a flipped advantage sign, with the
weight sync into vLLM skipped, or with the trainer's log-probs read one position off
must fail the same assertion - otherwise the assertion could not tell a correct
update from a broken one.

Also here: the sampler (vLLM) and the trainer agree on the log-probs of the sampled
tokens right after a weight sync, and the check notices a skipped sync or a stale weight.
"""
from __future__ import annotations

import pytest
import torch

from resrl.config import load_config
from resrl.metrics import sampler_agreement
from resrl.rollout import HFRolloutEngine, RolloutEngine
from resrl.trainer import PolicyTrainer

# the real ones (either rollout.backend): restarts and evaluations sync even when a test breaks it
_SYNC = {cls: cls.load_weights for cls in (RolloutEngine, HFRolloutEngine)}


def sync(engine, named) -> None:
    _SYNC[type(engine)](engine, named)

from conftest import ROOT, smoke_overrides

# GRPO on the smoke policy with a bigger batch; everything else as conf/smoke.yaml.
LEARN = ["algorithm.name=grpo", "rollout.prompts_per_step=32", "rollout.n=8", "trainer.micro_batch_size=64",
         "trainer.warmup_steps=1"]
STEPS = 10
MARGIN = 0.15          # rollout pass-rate gain GRPO must reach (seen: +0.4; broken variants <= ~0)
AGREE_TOL = 1e-4       # max |trainer - vLLM| log-prob gap after a sync, fp32 on the CPU (seen: ~1e-5)


@pytest.fixture(scope="module")
def learner(workdir, smoke_prepared):
    from resrl.session import TrainingSession

    cfg = load_config(ROOT / "conf" / "smoke.yaml", smoke_overrides(workdir) + LEARN)
    s = TrainingSession(cfg, smoke_prepared, smoke_prepared["policy_dir"], None)
    yield s
    s.close()


def restart(session) -> None:
    """Back to the warm-started policy: a new trainer (fresh optimizer), its weights synced to vLLM."""
    cfg = session.cfg
    session.trainer = PolicyTrainer(str(session.policy_dir), cfg,
                                    rollout_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.n)
    sync(session.engine, session.trainer.named_weights())


def pass_rate_gain(session, steps: int = STEPS) -> float:
    """Pass rate of step 1's rollout (same prompts, same sampling seed) after `steps` RL steps, minus before.

    Measured on what the sampler produces, as RL sees it: a policy that is trained but
    never reaches vLLM (a skipped sync) shows no gain here, even though the trainer's
    own weights may have improved. The same prompts before and after keep the
    prompts' difficulty out of the difference.
    """
    restart(session)
    rates = []
    for step in range(1, steps + 1):
        batch, metrics = session.rollout(step)
        rates.append(metrics["train/pass_rate"])
        session.update(step, batch)
    rates.append(session.rollout(1)[1]["train/pass_rate"])
    gain = rates[-1] - rates[0]
    print(f"rollout pass rate per step: {' '.join(f'{r:.2f}' for r in rates)}; gain on step 1's prompts {gain:+.3f}")
    return gain


def test_grpo_learns(learner):
    gain = pass_rate_gain(learner)
    assert gain >= MARGIN, f"GRPO lifted the rollouts' pass rate by only {gain:.3f} in {STEPS} steps"


def test_flipped_advantage_sign_does_not_learn(learner, monkeypatch):
    original = PolicyTrainer.advantages
    monkeypatch.setattr(PolicyTrainer, "advantages", lambda self, batch, scored: -original(self, batch, scored))
    assert pass_rate_gain(learner) < MARGIN


def test_skipped_weight_sync_does_not_learn(learner, monkeypatch):
    monkeypatch.setattr(type(learner.engine), "load_weights", lambda self, named: None)  # the per-step sync
    assert pass_rate_gain(learner) < MARGIN


def test_shifted_logprobs_do_not_learn(learner, monkeypatch):
    import resrl.trainer

    monkeypatch.setattr(resrl.trainer, "response_logits", lambda logits, T: logits[:, 1:T + 1])
    assert pass_rate_gain(learner) < MARGIN


# ----------------------------------------------------------------------------- sampler agreement

def _gap(session, step: int) -> float:
    """Max |trainer - sampler| log-prob over a fresh rollout's tokens."""
    batch, _ = session.rollout(step)
    scored = session.trainer.score(batch)
    return sampler_agreement(scored.logp, batch.sampler_logp_tensor(), batch.response_mask())[
        "sampler_logp_diff_max"]


def test_sampler_and_trainer_agree_after_sync_and_not_without(learner):
    restart(learner)
    for step in (1, 2):  # an updated policy, synced after each update
        batch, _ = learner.rollout(step)
        metrics = learner.update(step, batch)
        assert metrics["train/sampler_logp_diff_max"] < AGREE_TOL  # logged every step
        assert abs(metrics["train/sampler_ratio_mean"] - 1) < AGREE_TOL
        assert metrics["train/old_logp_from_sampler"] == 0.0  # vLLM keeps no states: the trainer scores (and checks)
    assert _gap(learner, 3) < AGREE_TOL

    batch, _ = learner.rollout(3)
    learner.trainer.train_step(batch, 3)  # updated, not synced
    assert _gap(learner, 4) > 10 * AGREE_TOL

    stale = "model.layers.1.mlp.down_proj.weight"  # everything synced but one tensor
    learner.engine.load_weights([(k, v) for k, v in learner.trainer.named_weights() if k != stale])
    assert _gap(learner, 4) > 10 * AGREE_TOL

    learner.engine.load_weights(learner.trainer.named_weights())
    assert _gap(learner, 4) < AGREE_TOL


def test_rollout_batch_keeps_sampler_logprobs(learner, tmp_path):
    from resrl.batch import RolloutBatch

    batch, _ = learner.rollout(1)
    assert batch.sampler_logp is not None
    assert [len(x) for x in batch.sampler_logp] == [len(x) for x in batch.response_ids]
    assert all(v <= 0 for seq in batch.sampler_logp for v in seq)
    again = RolloutBatch.load(batch.save(tmp_path / "b.safetensors"))
    flat = [v for seq in batch.sampler_logp for v in seq]
    assert [v for seq in again.sampler_logp for v in seq] == pytest.approx(flat, abs=1e-6)  # float32 on disk
    sel = batch.select([3, 0])
    assert sel.sampler_logp == [batch.sampler_logp[3], batch.sampler_logp[0]]
    t = batch.sampler_logp_tensor()
    assert torch.isnan(t[~batch.response_mask()]).all() and not torch.isnan(t[batch.response_mask()]).any()
