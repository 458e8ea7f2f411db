"""The policy update on a DeepSpeed engine.

One RL step, top to bottom (`PolicyTrainer.train_step`):

1. one no-grad pass over the batch, in chunks of whole prompt groups: old
   log-probs, entropy, and - for algorithms that weight tokens (ResRL) - the
   chosen layer's hidden states, turned into token weights chunk by chunk (so the
   states of the whole batch are never held at once). With one epoch of one
   mini-batch (`trainer.single_pass`) this pass is skipped: the loss's own forward,
   over the same chunks, gives all of it (`_single_pass_update`). Otherwise, when the
   Hugging Face sampler drew the batch in float32 (`trainer.sampler_scores`), its own
   log-probs and hidden states stand in for the pass (`_scores_from_sampler`), once a
   scoring pass has shown that they agree;
2. sequence advantages from rewards (the registered algorithm), times the token
   weights;
3. PPO: `epochs` passes of `mini_batches` optimizer steps, each mini-batch split
   into micro-batches whose losses sum exactly to the mini-batch loss;
4. diagnostics; every `algorithm.diagnostics_every` steps also the likelihood
   displacement (resrl/displacement.py): the change of each positive response's
   log-prob across the update, and the first-order push the negative samples' part of
   the loss alone gives the positives (two extra backward passes, before the update).

The engine's config is built in deepspeed_setup.py; checkpoints are read and written
by checkpoint.py. Data-parallel ranks (resrl/data_parallel.py) override the small hooks in
"the ranks' hooks" below: which rows this process scores and trains, the padding passes
that keep collectives in step, and the sums over the ranks.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from resrl import checkpoint, displacement, seeds
from resrl.schedule import diagnostics_due
from resrl.algorithms import SUMMED_KEYS, ResidualStats, get_algorithm, policy_loss, summed_keys, token_coefficients
from resrl.batch import RolloutBatch, SamplerStates
from resrl.deepspeed_setup import deepspeed_config, init_distributed, warmup_schedule
from resrl.devices import resolve_device, resolve_dtype
from resrl.errors import UserError
from resrl.hidden_states import capture_hidden
from resrl.metrics import advantage_metrics, sampler_agreement
from resrl.shared_prompts import forward_rows

# nats: the largest |trainer - sampler| token log-prob gap at which the sampler's log-probs stand in for the
# old ones (trainer.sampler_scores). Float32 on the CPU agrees to ~1e-5; a 1e-3 gap moves a PPO ratio by 0.1 %,
# far inside the clip range.
SAMPLER_LOGP_TOL = 1e-3


def response_logits(logits: torch.Tensor, T: int) -> torch.Tensor:
    """The logits that score response tokens 0..T-1, from the last T + 1 positions the forward
    kept (resrl/shared_prompts.py): kept position t predicts token t."""
    return logits[:, :T]


@contextlib.contextmanager
def evaluating(engine):
    """The engine in eval mode for the block, back in train mode after it (also on errors)."""
    engine.eval()
    try:
        yield
    finally:
        engine.train()


def group_chunks(group_ids: torch.Tensor, max_rows: int):
    """Row indices in chunks of whole groups, each at most max_rows rows (or one group)."""
    order = torch.argsort(group_ids, stable=True)
    ids = group_ids[order].tolist()
    chunk: list[int] = []
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        group = order[i:j].tolist()
        if chunk and len(chunk) + len(group) > max_rows:
            yield torch.tensor(chunk)
            chunk = []
        chunk += group
        i = j
    if chunk:
        yield torch.tensor(chunk)


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class TrainingDiverged(UserError):
    """A non-finite or diverged loss, gradient norm or weight: the step is not applied (or not saved)."""


@dataclass
class Scored:
    """What the no-grad pass yields for a batch (all (B, T), response-aligned)."""
    logp: torch.Tensor
    entropy: torch.Tensor
    token_weights: torch.Tensor
    ref_logp: torch.Tensor | None
    stats: ResidualStats
    residual_weights: torch.Tensor | None = None  # ResRL's weights, also when not applied (diagnostics)


class PolicyTrainer:
    rank, world_size = 0, 1  # one process; DataParallelTrainer sets its own

    def __init__(self, model_path: str, cfg, *, rollout_batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = resolve_device(cfg.trainer.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        init_distributed(self.device)
        import deepspeed

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.algorithm = get_algorithm(cfg.algorithm.name)
        # the token weights this run computes (ResRL's; for any algorithm with algorithm.diagnostics), or None
        self.token_fn = self.algorithm.weights_to_compute(cfg.algorithm.diagnostics)
        # with dropout the training forward is not the scoring forward: such a model keeps the separate pass
        self._dropout = any(isinstance(v, float) and v > 0 for k, v in model.config.to_dict().items()
                            if "dropout" in k) or any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                                      for m in model.modules())
        t = cfg.trainer
        ds_config = deepspeed_config(t, self.dtype, rollout_batch_size)
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.opt_steps_per_rl_step = t.mini_batches * t.epochs
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=warmup_schedule(t.warmup_steps * self.opt_steps_per_rl_step))
        # ZeRO-3 gathers the parameters around each engine call; the two calls of a shared-prompt forward are kept to one
        self._share_prompts = bool(t.share_prompts) and self.zero_stage < 3
        self._sampler_agrees = False  # until a scoring pass has checked the sampler's log-probs (sampler_scores_apply)
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ the RL step
    def train_step(self, batch: RolloutBatch, step: int, sampled: SamplerStates | None = None) -> dict[str, float]:
        """One RL update on `batch`; `sampled`: what the sampler kept from drawing it, if anything."""
        cfg, t = self.cfg, self.cfg.trainer
        self._step = step  # for the divergence guard's message
        svd_seed = seeds.residual_svd(cfg.seed, step)
        agg = self.algorithm.effective_loss_agg(cfg.loss.agg)
        diagnose = diagnostics_due(step, cfg.algorithm)
        mask = batch.response_mask()
        from_sampler = False
        if self.single_pass_applies(diagnose):
            # one on-policy pass: the loss's own forward gives the old log-probs and the hidden states
            scored, adv, train_rows, losses, grad_norms, sums = self._single_pass_update(batch, agg, svd_seed)
            pushed = {}
        else:
            # 1. old log-probs and token weights: the sampler's, or a no-grad pass
            from_sampler = self.sampler_scores_apply(batch, sampled, diagnose)
            scored = self._scores_from_sampler(batch, sampled, svd_seed) if from_sampler \
                else self.score(batch, seed=svd_seed)
            # 2. advantages, token by token
            adv = self.advantages(batch, scored)
            train_rows = torch.arange(len(batch))
            if self.algorithm.skip_zero_advantage:  # PSR/NSR: only their own samples enter the update
                train_rows = (adv != 0).any(dim=1).nonzero().flatten()
            pushed = self.negative_interference(batch, train_rows, adv, agg) if diagnose else {}
            # 3. PPO: `epochs` passes over the kept rows, one optimizer step per mini-batch
            keys = summed_keys(kl=scored.ref_logp is not None and bool(cfg.loss.kl_coef),
                               correction=self._corrected(batch))
            sampler = batch.sampler_logp_tensor() if self._corrected(batch) else None  # once per step
            gen = torch.Generator().manual_seed(seeds.minibatch_order(cfg.seed, step))
            losses, grad_norms, sums = [], [], Counter(dict.fromkeys(SUMMED_KEYS, 0.0))
            for _ in range(t.epochs if len(train_rows) else 0):
                perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
                for rows in torch.tensor_split(perm, t.mini_batches):
                    if not len(rows):
                        continue
                    if self._share_prompts:  # a group's rows side by side: fewer distinct prompts per micro-batch
                        rows = rows[torch.argsort(batch.group_ids[rows], stable=True)]
                    coef = torch.zeros(mask.shape)  # (B, T), non-zero only on this mini-batch
                    coef[rows] = token_coefficients(mask[rows], agg, max_len=cfg.rollout.max_tokens)
                    loss, norm, step_sums = self._optimizer_step(
                        self._micro_batches(rows), lambda m: self._micro_loss(batch, m, coef, scored, adv, sampler),
                        keys, batch)
                    losses.append(loss)
                    grad_norms.append(norm)
                    sums.update(step_sums)
        self._check_update(losses, grad_norms)  # before the weights are synced or saved
        # 4. diagnostics
        n_updates = max(len(losses), 1)
        metrics = {
            "loss": sum(losses) / n_updates,
            "grad_norm": sum(grad_norms) / n_updates,
            "lr": self.scheduler.get_last_lr()[0],
            "update_samples": float(len(train_rows)),
        }
        tokens = sums.pop("tokens")
        metrics["pg_loss"] = sums.pop("pg_loss") / n_updates
        metrics.update({k: v / tokens if tokens else float("nan") for k, v in sums.items()})
        metrics.update(advantage_metrics(adv, mask, batch.correct))
        metrics.update(scored.stats.as_dict())
        if scored.residual_weights is not None or diagnose:  # token classes only when something reads them
            classes = displacement.token_classes(batch.response_ids, batch.correct, batch.group_ids, mask.shape[1])
        if scored.residual_weights is not None:
            metrics.update(displacement.weights_by_class(scored.residual_weights, classes, mask, ~batch.correct))
        if diagnose:
            metrics.update(pushed)
            new_logp = self.positive_logp(batch)
            metrics.update(displacement.update_displacement(scored.logp, new_logp, mask, classes, batch.correct))
        metrics["old_logp_from_sampler"] = float(from_sampler)
        sampler = batch.sampler_logp_tensor()
        if sampler is not None and not from_sampler:  # the old log-probs come from the trainer: check the sampler's
            metrics.update(sampler_agreement(scored.logp, sampler, mask))
            self._note_agreement(metrics["sampler_logp_diff_max"], step)
        return metrics

    # ------------------------------------------------------------------ the sampler's scores
    def wants_sampler_states(self) -> int | None:
        """The hidden layer the sampler should keep while drawing a step's batch, so the update can
        skip its scoring pass (`sampler_scores_apply`); None when nothing is to be kept (the
        path is off, or can never apply here, or the algorithm weights no tokens)."""
        if not self._sampler_scores_possible():
            return None
        return self.cfg.algorithm.hidden_layer if self.token_fn is not None else None

    def _sampler_scores_possible(self) -> bool:
        """The run-wide conditions of `sampler_scores_apply`."""
        cfg = self.cfg
        return bool(cfg.trainer.sampler_scores and self.world_size == 1 and self.ref_model is None
                    and self.dtype == torch.float32 and cfg.loss.rollout_correction.mode == "none"
                    and float(cfg.rollout.top_p) >= 1.0 and int(cfg.rollout.top_k) <= 0)

    def sampler_scores_apply(self, batch: RolloutBatch, sampled: SamplerStates | None, diagnose: bool) -> bool:
        """Whether the sampler's log-probs (and hidden states) replace the scoring pass this step
        (`trainer.sampler_scores`). They are the old log-probs of a separate pass up to float noise
        when the sampler is the Hugging Face copy of these weights in float32, scoring the full
        distribution (no top-k / top-p) and with no rollout correction (which they would undo).
        A scoring pass still runs - and checks the agreement (`SAMPLER_LOGP_TOL`) - on the first
        update of a process, on diagnostics steps (they compare the two), with several ranks or a
        reference model, and for a batch the sampler's record does not cover (a resumed step)."""
        if not self._sampler_scores_possible() or sampled is None or not self._sampler_agrees or diagnose:
            return False
        if batch.sampler_logp is None or bool(torch.isnan(batch.sampler_logp_tensor()[batch.response_mask()]).any()):
            return False
        if self.token_fn is not None:  # the states the token weights are computed from
            if sampled.hidden is None or sampled.layer != self.cfg.algorithm.hidden_layer \
                    or len(sampled.hidden) != len(batch):
                return False
            if any(h is None or h.shape[0] != len(r) for h, r in zip(sampled.hidden, batch.response_ids)):
                return False
        return True

    def _note_agreement(self, gap: float, step: int) -> None:
        """After a scoring pass: whether the sampler's log-probs may stand in for the old ones."""
        agrees = math.isfinite(gap) and gap <= SAMPLER_LOGP_TOL
        if self._sampler_agrees and not agrees:
            warnings.warn(f"RL step {step}: the sampler's log-probs are {gap:.3g} nats from the trainer's (more than "
                          f"{SAMPLER_LOGP_TOL:g}); the old log-probs come from a scoring pass again "
                          "(trainer.sampler_scores)", RuntimeWarning, stacklevel=2)
        self._sampler_agrees = agrees

    def _scores_from_sampler(self, batch: RolloutBatch, sampled: SamplerStates, seed: int) -> Scored:
        """`_score_groups`'s result from the sampler's record: its log-probs as the old ones and its
        hidden states into the token weights, over the same chunks of whole groups (entropy: NaN,
        the scoring pass's only figure nothing here reads)."""
        mask = batch.response_mask()
        B, T = mask.shape
        logp = batch.sampler_logp_tensor().masked_fill(~mask, 0.0)
        weights, stats = torch.ones(B, T), []
        if self.token_fn is not None:
            H = sampled.hidden[0].shape[-1]
            for rows in group_chunks(batch.group_ids, self.cfg.trainer.micro_batch_size):
                t = max(max(len(batch.response_ids[r]) for r in rows.tolist()), 1)
                hidden = torch.zeros(len(rows), t, H)
                for i, r in enumerate(rows.tolist()):
                    hidden[i, :len(sampled.hidden[r])] = sampled.hidden[r]
                stats.append(self._weigh_tokens(weights, batch, rows, hidden.to(self.device),
                                                mask[rows, :t].to(self.device), seed))
        return self._scored(logp, torch.full((B, T), float("nan")), weights, None, stats)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, seed: int = 0) -> Scored:
        """Old log-probs and the token weights for the whole batch (this process scores its
        `_score_rows`, the ranks' parts are joined by `_join_scores`).

        The weights are computed for every algorithm when `algorithm.diagnostics` is on
        (so GRPO runs log what ResRL would see) but only an algorithm with token weights applies them.
        """
        own = self._score_rows(batch)
        part = self._score_groups(batch.select(own.tolist()), seed) if len(own) else None
        return self._join_scores(batch, own, part)

    def _score_groups(self, batch: RolloutBatch, seed: int) -> Scored:
        """The no-grad pass over `batch`, in chunks of whole prompt groups (the token weights are per group)."""
        B, T = len(batch), batch.response_mask().shape[1]
        logp = torch.zeros(B, T)
        entropy = torch.zeros(B, T)
        weights = torch.ones(B, T)
        ref = torch.zeros(B, T) if self.ref_model is not None else None
        stats = []
        layer = self.cfg.algorithm.hidden_layer if self.token_fn else None
        with evaluating(self.engine):
            for rows in group_chunks(batch.group_ids, self.cfg.trainer.micro_batch_size):
                lp, ent, mask, hidden = self._forward(self.engine, batch, rows, hidden_layer=layer)
                t = lp.shape[1]
                logp[rows, :t], entropy[rows, :t] = lp.float().cpu(), ent.float().cpu()
                if self.token_fn is not None:
                    stats.append(self._weigh_tokens(weights, batch, rows, hidden, mask, seed))
                if ref is not None:
                    rlp, _, _, _ = self._forward(self.ref_model, batch, rows)
                    ref[rows, :t] = rlp.float().cpu()
        return self._scored(logp, entropy, weights, ref, stats)

    @torch.no_grad()
    def _weigh_tokens(self, weights, batch: RolloutBatch, rows, hidden, mask, seed: int) -> ResidualStats:
        """The token weights of `rows` (whole groups) from their hidden states (len(rows), t, H), written into
        `weights[rows, :t]`; returns the chunk's stats."""
        w, st = self.token_fn(hidden, mask, batch.correct[rows].to(self.device), batch.group_ids[rows].to(self.device),
                              self.cfg.algorithm, seed=seed)
        weights[rows, :w.shape[1]] = w.float().cpu()
        return st

    def _scored(self, logp, entropy, weights, ref, stats: list[ResidualStats]) -> Scored:
        """The pass's result: the token weights apply only for an algorithm that weights tokens (the
        others compute them for the diagnostics alone, or not at all)."""
        applied = weights if self.algorithm.token_weights is not None else torch.ones_like(weights)
        return Scored(logp, entropy, applied, ref, ResidualStats.merge(stats),
                      weights if self.token_fn is not None else None)

    def advantages(self, batch: RolloutBatch, scored: Scored) -> torch.Tensor:
        seq_adv = self.algorithm.advantages(batch.rewards.float(), batch.correct, batch.group_ids,
                                            self.cfg.algorithm)
        return seq_adv[:, None] * scored.token_weights * batch.response_mask()

    def single_pass_applies(self, diagnose: bool) -> bool:
        """Whether this step's update needs no separate scoring pass (`trainer.single_pass`): one
        epoch of one mini-batch is one on-policy pass, so the old log-probs are the loss forward's
        own (detached: the ratio is 1, as after a separate pass at the same weights) and ResRL's
        hidden states come from that forward too. A separate pass stays for several mini-batches
        or epochs (later passes see updated weights), a reference model (its own forward), several
        ranks, a model with dropout (its training forward differs from the scoring one), and steps
        with the displacement diagnostics (they need the advantages before the update)."""
        t = self.cfg.trainer
        return bool(t.single_pass and t.epochs == 1 and t.mini_batches == 1 and self.world_size == 1
                    and self.ref_model is None and not self._dropout and not diagnose)

    def _single_pass_update(self, batch: RolloutBatch, agg: str, seed: int):
        """The update of `single_pass_applies`: one optimizer step over micro-batches of whole prompt
        groups (the token weights are per group), each forward giving its rows' old log-probs,
        entropy and token weights before its loss. Returns what the separate path has at the end:
        (scored, adv, train_rows, losses, grad_norms, sums)."""
        cfg = self.cfg
        mask = batch.response_mask()
        B, T = mask.shape
        seq_adv = self.algorithm.advantages(batch.rewards.float(), batch.correct, batch.group_ids, cfg.algorithm)
        train_rows = torch.arange(B)
        if self.algorithm.skip_zero_advantage:  # their token weights are ones: the rule of the separate path
            train_rows = ((seq_adv[:, None] * mask) != 0).any(dim=1).nonzero().flatten()
        coef = torch.zeros(B, T)
        coef[train_rows] = token_coefficients(mask[train_rows], agg, max_len=cfg.rollout.max_tokens)
        layer = cfg.algorithm.hidden_layer if self.token_fn else None
        logp, entropy, weights, adv = torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T), torch.zeros(B, T)
        stats = []
        correction = self._corrected(batch)
        sampler = batch.sampler_logp_tensor() if correction else None

        def loss_of(rows):
            lp, ent, m, hidden = self._forward(self.engine, batch, rows, hidden_layer=layer)
            w = lp.shape[1]
            logp[rows, :w], entropy[rows, :w] = lp.detach().float().cpu(), ent.detach().float().cpu()  # old = own
            if self.token_fn is not None:
                stats.append(self._weigh_tokens(weights, batch, rows, hidden.detach(), m, seed))
            applied = weights[rows, :w] if self.algorithm.token_weights is not None else torch.ones(len(rows), w)
            adv[rows, :w] = seq_adv[rows, None] * applied * mask[rows, :w]
            return self._policy_loss(rows, lp, ent, m, logp, adv, coef, None, sampler)  # no reference model here

        # rows outside the update are forwarded only when their hidden states feed the token weights
        micro = list(group_chunks(batch.group_ids, cfg.trainer.micro_batch_size)) if self.token_fn is not None \
            else self._micro_batches(train_rows)
        losses, grad_norms, sums = [], [], Counter(dict.fromkeys(SUMMED_KEYS, 0.0))
        if len(train_rows):
            loss, norm, sums_ = self._optimizer_step(micro, loss_of, summed_keys(kl=False, correction=correction),
                                                     batch)
            losses, grad_norms = [loss], [norm]
            sums.update(sums_)
        elif self.token_fn is not None:  # nothing to train, but the weights are still logged
            with torch.no_grad():
                for rows in micro:
                    loss_of(rows)
        scored = self._scored(logp, entropy, weights, None, stats)
        return scored, adv, train_rows, losses, grad_norms, sums

    def _corrected(self, batch: RolloutBatch) -> bool:
        """Whether the loss applies a rollout correction (configured, and the batch has the sampler's log-probs)."""
        return self.cfg.loss.rollout_correction.mode != "none" and batch.sampler_logp is not None

    def _optimizer_step(self, micro: list[torch.Tensor], loss_of, keys, batch) -> tuple[float, float, Counter]:
        """Accumulate gradients over this process's micro-batches `micro` (`loss_of(rows)` gives a
        micro-batch's loss and token sums), then one optimizer step. Returns the summed loss, the
        gradient norm and the micro-batches' token sums `keys` (over all ranks)."""
        total, norm, sums = 0.0, float("nan"), Counter()
        for k, mrows in enumerate(micro):
            last = k == len(micro) - 1
            if len(mrows):
                loss, part = loss_of(mrows)
                sums.update({key: float(value) for key, value in part.items()})
            else:  # this rank has no rows left: a pass with no weight keeps the ranks' collectives in step
                loss = self._idle_forward(batch)
            self.engine.set_gradient_accumulation_boundary(last)
            # the coefficients already normalize the mini-batch; DeepSpeed averages over the ranks,
            # the global loss is the sum of the ranks' losses
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if last:
                norm = self._grad_norm_before_step()
                self._refuse_gradient(norm)  # a non-finite or too large gradient never reaches the weights
            self.engine.step()
            total += float(loss.detach())
        total, sums = self._sum_over_ranks(total, Counter({key: sums.get(key, 0.0) for key in keys}))
        return total, self._grad_norm_after(norm), sums

    def _micro_loss(self, batch, mrows, coef, scored, adv, sampler):
        """The policy loss of one micro-batch (rows `mrows`) and its token sums."""
        logp, entropy, mask, _ = self._forward(self.engine, batch, mrows)
        return self._policy_loss(mrows, logp, entropy, mask, scored.logp, adv, coef, scored.ref_logp, sampler)

    def _policy_loss(self, rows, logp, entropy, mask, old, adv, coef, ref, sampler):
        """The configured policy loss of micro-batch `rows` from its forward (`logp`, `entropy`,
        `mask`) and the whole batch's (B, T) old log-probs, advantages, loss coefficients and,
        when used, reference and sampler log-probs (None when not)."""
        loss, rc, w = self.cfg.loss, self.cfg.loss.rollout_correction, logp.shape[1]

        def take(x):  # this micro-batch's rows, trimmed to its response width
            return x[rows, :w].to(self.device) if x is not None else None
        return policy_loss(
            logp, take(old), take(adv), take(coef), mask,
            clip_low=loss.clip_low, clip_high=loss.clip_high, dual_clip=loss.dual_clip,
            entropy=entropy, entropy_coef=loss.entropy_coef, ref_logp=take(ref), kl_coef=loss.kl_coef,
            kl_type=loss.kl_type, sampler_logp=take(sampler), rollout_correction=rc.mode,
            correction_cap=rc.cap, correction_low=rc.low)

    @torch.no_grad()
    def positive_logp(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) log-probs of the positive responses' tokens under the current weights (0 elsewhere)."""
        out = torch.zeros(batch.response_mask().shape)
        with evaluating(self.engine):
            for rows in self._micro_batches(batch.correct.nonzero().flatten()):
                if not len(rows):
                    self._idle_scoring_pass(batch)
                    continue
                logp, _, _, _ = self._forward(self.engine, batch, rows)
                out[rows, :logp.shape[1]] = logp.float().cpu()
        return self._add_over_ranks(out)

    def negative_interference(self, batch: RolloutBatch, rows: torch.Tensor, adv: torch.Tensor,
                              agg: str) -> dict[str, float]:
        """How the negative samples' part of this step's loss alone moves the positives' log-probs, to
        first order, at the current weights (resrl/displacement.py). Its gradient at ratio 1 (on-policy)
        is that of -sum(coef * adv * log pi) over the tokens with negative advantage; the positives'
        is that of their mean sequence log-prob. Plain autograd on the module: no optimizer state or
        gradient buffer is touched. Skipped (empty) under ZeRO-3 and with several ranks, where
        parameters or gradients are partitioned."""
        if self.zero_stage == 3 or self.world_size > 1:
            return {}
        mask = batch.response_mask()
        neg_rows = rows[(adv[rows] < 0).any(dim=1)]
        pos_rows = batch.correct.nonzero().flatten()
        if not len(neg_rows) or not len(pos_rows):
            return {}
        module = self.engine.module
        params = [p for p in module.parameters() if p.requires_grad]
        coef = torch.zeros(mask.shape)
        coef[rows] = token_coefficients(mask[rows], agg, max_len=self.cfg.rollout.max_tokens)
        neg_coef = (coef * adv).clamp(max=0.0)  # only the tokens that are pushed down

        def grad_of(rows_, weight):  # gradient of sum(weight * log pi) over `rows_`, micro-batch by micro-batch
            total = [torch.zeros_like(p) for p in params]
            for mrows in micro_batches(rows_, self.cfg.trainer.micro_batch_size):
                logp, _, _, _ = self._forward(module, batch, mrows)
                w = weight[mrows, :logp.shape[1]].to(logp.device)
                for t, g in zip(total, torch.autograd.grad((logp * w).sum(), params, allow_unused=True)):
                    if g is not None:
                        t += g
            return total

        with evaluating(self.engine):
            neg_grad = grad_of(neg_rows, -neg_coef)  # the gradient of the loss -sum(coef * adv * log pi)
            pos_grad = grad_of(pos_rows, mask.float() / len(pos_rows))
        return displacement.interference(neg_grad, pos_grad)

    # ------------------------------------------------------------------ the ranks' hooks (one process: trivial)
    def _score_rows(self, batch: RolloutBatch) -> torch.Tensor:
        """The rows this process scores: all of them."""
        return torch.arange(len(batch))

    def _join_scores(self, batch: RolloutBatch, rows: torch.Tensor, part: Scored | None) -> Scored:
        """The whole batch's scores from this process's part: the part itself."""
        return part

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This process's micro-batches of `rows`; an empty one is a padding pass."""
        return micro_batches(rows, self.cfg.trainer.micro_batch_size)

    def _idle_forward(self, batch: RolloutBatch) -> torch.Tensor:
        """A pass over one row with no weight in the loss (keeps the ranks' per-pass collectives in step)."""
        logp, _, _, _ = self._forward(self.engine, batch, torch.tensor([0]))
        return logp.sum() * 0.0

    def _idle_scoring_pass(self, batch: RolloutBatch) -> None:
        """A no-grad padding pass where the ranks' parameters are gathered per pass (ZeRO-3)."""
        if self.zero_stage == 3:
            self._idle_forward(batch)

    def _sum_over_ranks(self, total: float, sums: Counter) -> tuple[float, Counter]:
        return total, sums

    def _add_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def _sync(self) -> None:
        """After a collective write (checkpoints): nothing to wait for on one process."""

    # ------------------------------------------------------------------ forward pass and gradient norm
    def _forward(self, model, batch: RolloutBatch, rows: torch.Tensor, *, hidden_layer=None):
        """Response log-probs and entropy (B, T) of the batch's `rows`; optionally the hidden states (B, T, H)."""
        idx = rows.tolist()
        ctx = capture_hidden(getattr(model, "module", model), hidden_layer) if hidden_layer is not None \
            else contextlib.nullcontext({})
        with ctx as box:
            out = forward_rows(model, [batch.prompt_ids[r] for r in idx], [batch.response_ids[r] for r in idx],
                               self.pad_id, self.device, share_prompts=self._share_prompts)
        T = out.mask.shape[1]
        logits = response_logits(out.logits, T).float()
        if self.cfg.rollout.temperature > 0:  # score the distribution the sampler drew from
            logits = logits / self.cfg.rollout.temperature
        logprobs = logits.log_softmax(-1)
        logp = logprobs.gather(-1, out.targets[..., None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        hidden = box["h"][:, out.state_offset:out.state_offset + T] if hidden_layer is not None else None
        return logp * out.mask, entropy * out.mask, out.mask, hidden

    def _grad_norm_after(self, norm: float) -> float:
        """`norm` from before the step, or (ZeRO, mixed precision) the engine's own figure."""
        if math.isnan(norm):
            got = self.engine.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
        return norm

    def _grad_norm_before_step(self) -> float:
        """Gradient norm before clipping. Only a plain fp32 optimizer keeps grads on the
        parameters; for ZeRO and mixed precision the engine reports it after the step."""
        if not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            return float("nan")
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ------------------------------------------------------------------ the divergence guard
    def _diverged(self, what: str, value: float, applied: bool) -> TrainingDiverged:
        done = ("it was applied in memory but this step is neither synced nor saved" if applied
                else "the optimizer step was not applied")
        return TrainingDiverged(
            f"training diverged at RL step {getattr(self, '_step', '?')}: {what} ({value:.4g}); {done}, and the "
            f"run keeps its last committed checkpoint. Lower trainer.lr (now {self.cfg.trainer.lr:g}), check the "
            "rewards, or see trainer.max_grad_norm_accepted / trainer.max_abs_weight_accepted.")

    def _refuse_gradient(self, norm: float) -> None:
        """Before `engine.step()`: refuse a non-finite gradient norm, or one above
        trainer.max_grad_norm_accepted. Only the plain fp32 optimizer knows the norm before the
        step (`_grad_norm_before_step`); ZeRO's is checked after it, in `_check_update`."""
        if not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            return
        limit = self.cfg.trainer.max_grad_norm_accepted
        if not math.isfinite(norm):
            raise self._diverged("the gradient norm is not finite", norm, applied=False)
        if limit is not None and norm > limit:
            raise self._diverged(f"the gradient norm exceeds trainer.max_grad_norm_accepted={limit:g}", norm,
                                 applied=False)

    @torch.no_grad()
    def _check_update(self, losses: list[float], grad_norms: list[float]) -> None:
        """After the step's optimizer steps: the losses, the norms ZeRO reported after its steps, and
        every weight (finite, and at most trainer.max_abs_weight_accepted in magnitude)."""
        for loss in losses:
            if not math.isfinite(loss):
                raise self._diverged("the loss is not finite", loss, applied=True)
        for norm in grad_norms:
            limit = self.cfg.trainer.max_grad_norm_accepted
            if not math.isfinite(norm) and not isinstance(self.engine.optimizer, torch.optim.Optimizer):
                raise self._diverged("the gradient norm is not finite", norm, applied=True)
            if limit is not None and norm > limit:
                raise self._diverged(f"the gradient norm exceeds trainer.max_grad_norm_accepted={limit:g}", norm,
                                     applied=True)
        limit = self.cfg.trainer.max_abs_weight_accepted
        for name, p in self.engine.module.named_parameters():
            data = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
            if not data.numel():
                continue
            top = float(data.detach().abs().max())
            if not math.isfinite(top):
                raise self._diverged(f"weight {name} is not finite", top, applied=True)
            if limit is not None and top > limit:
                raise self._diverged(f"weight {name} exceeds trainer.max_abs_weight_accepted={limit:g} in "
                                     "magnitude", top, applied=True)

    # ------------------------------------------------------------------ weights and checkpoints
    def named_weights(self):
        """Full (gathered) weights for the rollout engine and for saving."""
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return [(k, v.detach().clone()) for k, v in module.state_dict().items()]
        return [(k, v.detach()) for k, v in module.state_dict().items()]

    def save_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        """With several ranks every rank takes part (gathering ZeRO-3 weights and writing ZeRO's shards
        are collective) and rank 0 writes what is replicated (several machines need a shared file
        system for the run folder)."""
        checkpoint.save(ckpt_dir, step, self.engine, dict(self.named_weights()), self.tokenizer,
                        leader=self.rank == 0)
        self._sync()

    def load_checkpoint(self, ckpt_dir: Path) -> int:
        """Restore the optimizer state and the LR schedule's position; returns the RL step saved."""
        step = checkpoint.load(ckpt_dir, self.engine)
        with warnings.catch_warnings():  # stepping the schedule forward without optimizer steps is the point
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step * self.opt_steps_per_rl_step):
                self.scheduler.step()
        return step
