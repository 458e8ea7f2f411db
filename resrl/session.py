"""The live state of one training run: the vLLM engine and the DeepSpeed trainer.

Both are expensive to start, so a run keeps one of each for its whole length; the
orchestration layer (Prefect tasks) passes only configs, paths and step numbers and
looks the session up by run folder (`get_session`). With data-parallel ranks, rank 0's
session sends each call to the other ranks (`resrl.ranks.lead`), whose `follow()` loop runs
the same method on their own session, so the collectives of both sides meet.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from resrl import seeds
from resrl.batch import RolloutBatch, SamplerStates
from resrl.config import from_dict, to_dict
from resrl.data import load_prepared
from resrl.data_parallel import make_trainer
from resrl.evaluation import evaluate, score_samples
from resrl.metrics import rollout_metrics
from resrl.ranks import group_share, lead, receive, world
from resrl.rewards import load_reward_function, math_equiv
from resrl.rewards.shaping import shape_rewards
from resrl.rollout import make_rollout_engine


_SESSIONS: dict[str, "TrainingSession"] = {}


def get_session(key: str) -> "TrainingSession | None":
    return _SESSIONS.get(key)


def open_session(key: str, cfg, prepared: dict, policy_dir: str, checkpoint_dir: str | None) -> "TrainingSession":
    if key not in _SESSIONS:
        # data-parallel ranks: the followers open the same session (rank 0 leads every call below)
        lead("open", config=to_dict(cfg), prepared=prepared, policy_dir=policy_dir, checkpoint_dir=checkpoint_dir)
        _SESSIONS[key] = TrainingSession(cfg, prepared, policy_dir, checkpoint_dir)
    return _SESSIONS[key]


def close_session(key: str) -> None:
    session = _SESSIONS.pop(key, None)
    if session is not None:
        session.close()


def follow() -> int:
    """A follower rank's whole life: run rank 0's session commands until it closes."""
    session = None
    while True:
        command, kwargs = receive()
        if command == "exit":
            return 0
        if command == "open":
            session = TrainingSession(from_dict(kwargs["config"]), kwargs["prepared"], kwargs["policy_dir"],
                                      kwargs["checkpoint_dir"])
        elif command == "close":
            if session is not None:
                session.close()
            return 0
        else:
            getattr(session, command)(**kwargs)


class TrainingSession:
    def __init__(self, cfg, prepared: dict, policy_dir: str, checkpoint_dir: str | None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per checkpoint save would drown the step lines
        self.cfg = cfg
        self.policy_dir = policy_dir
        data = load_prepared(Path(prepared["dataset_dir"]))
        self.train_set, self.test_set = data["train"], data["test"]
        self.reward_fn = load_reward_function(cfg.reward.function)
        math_equiv.set_timeout(cfg.reward.timeout_s)
        longest_prompt = max(max(len(p) for p in s["prompt_token_ids"]) for s in (self.train_set, self.test_set))
        self.rank, self.world_size = world()
        if self.world_size > 1:  # the ranks' process group first: vLLM's external launcher joins it
            from resrl.devices import resolve_device
            from resrl.deepspeed_setup import init_distributed

            init_distributed(resolve_device(cfg.trainer.device))
        self.engine = make_rollout_engine(policy_dir, cfg, longest_prompt)
        self.engine.warm_up(self.train_set[0]["prompt_token_ids"])  # not inside the first timed rollout
        self.trainer = make_trainer(policy_dir, cfg, rollout_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.n)
        self.start_step = self.trainer.load_checkpoint(Path(checkpoint_dir)) if checkpoint_dir else 0
        self._sampled: SamplerStates | None = None  # what the sampler kept from the last rollout, for its update
        self.eos_id = self.trainer.tokenizer.eos_token_id
        gen_eos = getattr(self.trainer.engine.module.generation_config, "eos_token_id", None)
        self.stop_ids = {self.eos_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}

    # ------------------------------------------------------------------ prompts
    def prompt_indices(self, step: int) -> list[int]:
        """Train prompts of RL step `step` (1-based): a seeded reshuffle per pass over the data."""
        N, P = len(self.train_set), self.cfg.rollout.prompts_per_step
        out = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, N)
            order = list(range(N))
            random.Random(seeds.prompt_order(self.cfg.seed, epoch)).shuffle(order)
            out.append(order[pos])
        return out

    # ------------------------------------------------------------------ steps
    def rollout(self, step: int) -> tuple[RolloutBatch | None, dict[str, float]]:
        """The step's rollouts, scored. With several ranks each samples its share of the prompt
        groups; rank 0 gathers them and returns the whole batch, the others return (None, {})."""
        lead("rollout", step=step)
        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.time()
        idx = self.prompt_indices(step)
        share = group_share(len(idx), self.rank, self.world_size)
        rows = [self.train_set[idx[g]] for g in share]
        # prompt g of the step samples with seed + g on whichever rank holds it
        sampling = dict(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens,
                        seed=seeds.rollout(cfg.seed, step) + share.start, logprobs=True)
        prompts = [row["prompt_token_ids"] for row in rows]
        keeps = hasattr(self.engine, "generate_with_states")  # the hf sampler; vLLM keeps no states
        layer = self.trainer.wants_sampler_states() if keeps else None
        self._sampled = None
        if layer is not None:  # the sampler keeps ResRL's hidden states: the update skips its scoring pass
            outputs, states = self.engine.generate_with_states(prompts, hidden_layer=layer, **sampling)
        else:
            outputs, states = self.engine.generate(prompts, **sampling), None
        scores, errors = score_samples(self.reward_fn, rows, outputs, cfg.reward.max_error_fraction)
        if self.world_size > 1:
            import torch.distributed as dist

            parts = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object((outputs, scores, errors), parts, dst=0)
            if self.rank != 0:
                return None, {}
            rows = [self.train_set[i] for i in idx]
            outputs = [o for p in parts for o in p[0]]
            scores = [x for p in parts for x in p[1]]
            errors = sum(p[2] for p in parts)
        prompt_ids, response_ids, texts, group_ids, sampler_logp, hidden = [], [], [], [], [], []
        for g, (row, samples) in enumerate(zip(rows, outputs)):
            for s, (ids, text, logp) in enumerate(samples):
                prompt_ids.append(row["prompt_token_ids"])
                response_ids.append(ids if ids else [self.eos_id])
                sampler_logp.append(logp if ids else [float("nan")])
                hidden.append(states[g][s] if states is not None and ids else None)
                texts.append(text)
                group_ids.append(g)
        scores_t = torch.tensor(scores)
        rewards = shape_rewards(scores, [len(ids) for ids in response_ids], cfg.reward.length_scale, r.max_tokens)
        batch = RolloutBatch(prompt_ids, response_ids, rewards, scores_t, torch.tensor(group_ids), texts,
                             sampler_logp)
        if keeps and self.world_size == 1:
            self._sampled = SamplerStates(step, layer, hidden if states is not None else None)
        metrics = {f"train/{k}": v for k, v in rollout_metrics(batch, r.n, r.max_tokens, self.stop_ids).items()}
        metrics["train/reward_errors"] = float(errors)
        metrics["time/rollout_s"] = time.time() - t0
        return batch, metrics

    def update(self, step: int, batch: RolloutBatch) -> dict[str, float]:
        lead("update", step=step, batch=batch)  # every rank trains on the whole batch
        t0 = time.time()
        sampled, self._sampled = self._sampled, None
        if sampled is not None and sampled.step != step:
            sampled = None  # not this batch's record (the trainer checks that it covers the batch)
        metrics = {f"train/{k}": v for k, v in self.trainer.train_step(batch, step, sampled).items()}
        t1 = time.time()
        self.engine.load_weights(self.trainer.named_weights())
        metrics["time/update_s"] = t1 - t0
        metrics["time/weight_sync_s"] = time.time() - t1
        return metrics

    def evaluate(self, step: int, final: bool = False) -> tuple[dict[str, float], list[dict]]:
        """Avg@k, Pass@1,2,4..k and diversity on the held-out prompts; plus sample rows."""
        return evaluate(self.engine, self.test_set, self.cfg.eval, self.reward_fn, self.cfg.seed, step, final=final,
                        max_error_fraction=self.cfg.reward.max_error_fraction)

    def save_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        lead("save_checkpoint", ckpt_dir=ckpt_dir, step=step)
        self.trainer.save_checkpoint(ckpt_dir, step)

    def close(self) -> None:
        lead("close")  # closing vLLM ends the ranks' process group: the followers exit after this
        del self.trainer  # the DeepSpeed engine, its optimizer state and the reference model ...
        self.engine.close()  # ... are collected with the engine's memory here
