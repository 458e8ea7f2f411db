"""The policy update on a DeepSpeed engine.

One RL step, top to bottom (`PolicyTrainer.train_step`):

1. one no-grad pass over the batch, in chunks of whole prompt groups: old
   log-probs, entropy, and - for algorithms that weight tokens (ResRL) - the
   chosen layer's hidden states, turned into token weights chunk by chunk (so the
   states of the whole batch are never held at once);
2. sequence advantages from rewards (the registered algorithm), times the token
   weights;
3. PPO: `epochs` passes of `mini_batches` optimizer steps, each mini-batch split
   into micro-batches whose losses sum exactly to the mini-batch loss;
4. diagnostics, among them the lazy likelihood displacement: the mean per-token
   change of log pi(y+|x) over the positive responses across the update.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from resrl.algorithms import ResidualStats, get_algorithm, policy_loss, token_coefficients
from resrl.algorithms.advantages import resrl_token_weights
from resrl.batch import RolloutBatch, pack
from resrl.devices import resolve_device, resolve_dtype
from resrl.environment import set_single_process_world
from resrl.errors import ConfigError
from resrl.metrics import sampler_agreement
from resrl import seeds

log = logging.getLogger(__name__)


def init_distributed(device: str) -> None:
    """A world of one process (gloo on the CPU, nccl on CUDA), unless launched by a launcher."""
    set_single_process_world(device)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    # Closing a vLLM engine destroys the default process group; DeepSpeed keeps its clone of
    # the old world group and fails on the next engine in this process ("Group ... is not
    # registered"). Drop the stale clone so DeepSpeed clones the current world again.
    from deepspeed.utils import groups

    world = groups._WORLD_GROUP
    if world is not None and world not in torch.distributed.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def response_logits(logits: torch.Tensor, T: int) -> torch.Tensor:
    """The logits that score response tokens 0..T-1, from the last T + 1 positions of a
    packed batch (prompt left-padded to P): position P - 1 + t predicts token t."""
    return logits[:, :T]


@contextlib.contextmanager
def capture_hidden(model, layer: int):
    """Record the hidden state `output_hidden_states[layer]` would give, via a forward hook.

    Index j of HF's `hidden_states` tuple is the embedding output (0), the output of
    decoder layer j-1 (1..L-1), or the final-normed output (L, i.e. -1).
    """
    box: dict[str, torch.Tensor] = {}
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no .model.layers: resrl cannot read its hidden states "
                          "(ResRL's weights and diagnostics need them; algorithm.diagnostics=false and a "
                          "baseline algorithm avoid it)")
    L = len(layers)
    j = layer + L + 1 if layer < 0 else layer
    if not 1 <= j <= L:
        raise ConfigError(f"algorithm.hidden_layer={layer} is outside 1..{L} (or -1..-{L})")
    target = base.norm if j == L else layers[j - 1]

    def hook(_module, _inputs, output):
        box["h"] = output[0] if isinstance(output, tuple) else output

    handle = target.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@dataclass
class Scored:
    """What the no-grad pass yields for a batch (all (B, T), response-aligned)."""
    logp: torch.Tensor
    entropy: torch.Tensor
    token_weights: torch.Tensor
    ref_logp: torch.Tensor | None
    stats: ResidualStats


class PolicyTrainer:
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
        t = cfg.trainer
        # bf16/fp16 keep fp32 master weights in the optimizer; ZeRO (stage >= 1) saves and restores
        # them with its checkpoints, DeepSpeed's stage-0 BF16 optimizer does not - so use stage 1.
        self.zero_stage = max(t.zero_stage, 1) if self.dtype != torch.float32 else t.zero_stage
        if self.zero_stage != t.zero_stage:
            log.info("mixed precision: using ZeRO stage 1 instead of 0 (fp32 master weights in checkpoints)")
        self.opt_steps_per_rl_step = t.mini_batches * t.epochs
        mini = rollout_batch_size // t.mini_batches
        warmup = max(1, t.warmup_steps * self.opt_steps_per_rl_step)
        ds_config = {
            "train_micro_batch_size_per_gpu": min(t.micro_batch_size, mini),
            "gradient_accumulation_steps": max(1, math.ceil(mini / t.micro_batch_size)),
            "gradient_clipping": t.grad_clip,
            "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                      "weight_decay": t.weight_decay, "torch_adam": True}},
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16},
            "steps_per_print": 10**9,
        }
        if self.dtype != torch.float32:  # accumulate micro-batch gradients in fp32, not in the model dtype
            ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)))
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _forward(self, model, prompt_ids, response_ids, *, hidden_layer=None):
        """Response log-probs and entropy (B, T); optionally the hidden states (B, T, H)."""
        packed = pack(prompt_ids, response_ids, self.pad_id)
        P, T = packed["prompt_width"], packed["response_mask"].shape[1]
        inputs = {k: packed[k].to(self.device) for k in ("input_ids", "attention_mask", "position_ids")}
        ctx = capture_hidden(getattr(model, "module", model), hidden_layer) if hidden_layer is not None \
            else contextlib.nullcontext({})
        with ctx as box:
            out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
        logits = response_logits(out.logits, T).float()
        if self.cfg.rollout.temperature > 0:  # score the distribution the sampler drew from
            logits = logits / self.cfg.rollout.temperature
        logprobs = logits.log_softmax(-1)
        targets = inputs["input_ids"][:, P:P + T]
        logp = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        mask = packed["response_mask"].to(self.device)
        hidden = box["h"][:, P - 1:P + T - 1] if hidden_layer is not None else None
        return logp * mask, entropy * mask, mask, hidden

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, seed: int = 0) -> Scored:
        """Old log-probs and the residual token weights for the whole batch, in chunks of whole groups.

        The weights are computed for every algorithm when `algorithm.diagnostics` is on
        (so GRPO runs log what ResRL would see) but only ResRL applies them.
        """
        B, T = len(batch), batch.response_mask().shape[1]
        logp = torch.zeros(B, T)
        entropy = torch.zeros(B, T)
        weights = torch.ones(B, T)
        ref = torch.zeros(B, T) if self.ref_model is not None else None
        stats = []
        correct = batch.correct
        token_fn = self.algorithm.token_weights or (resrl_token_weights if self.cfg.algorithm.diagnostics else None)
        layer = self.cfg.algorithm.hidden_layer if token_fn else None
        self.engine.eval()
        try:
            for rows in self._group_chunks(batch.group_ids, self.cfg.trainer.micro_batch_size):
                p = [batch.prompt_ids[r] for r in rows]
                r_ids = [batch.response_ids[r] for r in rows]
                lp, ent, mask, hidden = self._forward(self.engine, p, r_ids, hidden_layer=layer)
                t = lp.shape[1]
                logp[rows, :t], entropy[rows, :t] = lp.float().cpu(), ent.float().cpu()
                if token_fn is not None:
                    w, st = token_fn(hidden, mask, correct[rows].to(self.device),
                                     batch.group_ids[rows].to(self.device), self.cfg.algorithm, seed=seed)
                    weights[rows, :t] = w.float().cpu()
                    stats.append(st)
                if ref is not None:
                    rlp, _, _, _ = self._forward(self.ref_model, p, r_ids)
                    ref[rows, :t] = rlp.float().cpu()
        finally:
            self.engine.train()
        applied = weights if self.algorithm.token_weights is not None else torch.ones(B, T)
        return Scored(logp, entropy, applied, ref, ResidualStats.merge(stats))

    @staticmethod
    def _group_chunks(group_ids: torch.Tensor, max_rows: int):
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

    # ------------------------------------------------------------------ update
    def advantages(self, batch: RolloutBatch, scored: Scored) -> torch.Tensor:
        seq_adv = self.algorithm.advantages(batch.rewards.float(), batch.correct, batch.group_ids,
                                            self.cfg.algorithm)
        return seq_adv[:, None] * scored.token_weights * batch.response_mask()

    def train_step(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.trainer
        scored = self.score(batch, seed=seeds.residual_svd(cfg.seed, step))
        adv = self.advantages(batch, scored)
        mask = batch.response_mask()
        agg = self.algorithm.effective_loss_agg(cfg.loss.agg)
        train_rows = torch.arange(len(batch))
        if self.algorithm.skip_zero_advantage:  # PSR/NSR: only their own samples enter the update
            train_rows = (adv != 0).any(dim=1).nonzero().flatten()
        gen = torch.Generator().manual_seed(seeds.minibatch_order(cfg.seed, step))
        sums: dict[str, float] = {"tokens": 0.0, "pg_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0}
        losses, grad_norms = [], []
        for _ in range(t.epochs if len(train_rows) else 0):
            perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
            for rows in torch.tensor_split(perm, t.mini_batches):
                if not len(rows):
                    continue
                coef = torch.zeros(mask.shape)  # (B, T), non-zero only on this mini-batch
                coef[rows] = token_coefficients(mask[rows], agg, max_len=cfg.rollout.max_tokens)
                loss, norm = self._optimizer_step(batch, rows, coef, scored, adv, sums)
                losses.append(loss)
                grad_norms.append(norm)
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
        metrics.update(self._advantage_stats(adv, mask, batch))
        metrics.update(scored.stats.as_dict())
        metrics["lld"] = self.likelihood_displacement(batch, scored.logp)
        sampler = batch.sampler_logp_tensor()
        if sampler is not None:  # the old log-probs come from the trainer; check them against vLLM's
            metrics.update(sampler_agreement(scored.logp, sampler, mask))
        return metrics

    def _optimizer_step(self, batch, rows, coef, scored, adv, sums):
        """Accumulate gradients over the micro-batches of `rows`, then one optimizer step."""
        cfg, t = self.cfg, self.cfg.trainer
        micro = [rows[i:i + t.micro_batch_size] for i in range(0, len(rows), t.micro_batch_size)]
        total = 0.0
        norm = float("nan")
        for k, mrows in enumerate(micro):
            last = k == len(micro) - 1
            p = [batch.prompt_ids[r] for r in mrows.tolist()]
            r_ids = [batch.response_ids[r] for r in mrows.tolist()]
            logp, entropy, mask, _ = self._forward(self.engine, p, r_ids)
            w = logp.shape[1]

            def take(x, rows=mrows, width=w):  # this micro-batch's rows, trimmed to its response width
                return x[rows, :width].to(self.device)
            loss, part = policy_loss(
                logp, take(scored.logp), take(adv), take(coef), mask,
                clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high, dual_clip=cfg.loss.dual_clip,
                entropy=entropy, entropy_coef=cfg.loss.entropy_coef,
                ref_logp=take(scored.ref_logp) if scored.ref_logp is not None else None,
                kl_coef=cfg.loss.kl_coef, kl_type=cfg.loss.kl_type)
            for key, value in part.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=False)  # coefficients already normalize the mini-batch
            if last:
                norm = self._grad_norm_before_step()
            self.engine.step()
            total += float(loss.detach())
        if math.isnan(norm):
            got = self.engine.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
        return total, norm

    def _grad_norm_before_step(self) -> float:
        """Gradient norm before clipping. Only a plain fp32 optimizer keeps grads on the
        parameters; for ZeRO and mixed precision the engine reports it after the step."""
        if not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            return float("nan")
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @staticmethod
    def _advantage_stats(adv, mask, batch):
        valid = adv[mask]
        correct = batch.correct
        return {
            "adv/mean": float(valid.mean()) if valid.numel() else 0.0,
            "adv/abs_mean": float(valid.abs().mean()) if valid.numel() else 0.0,
            "adv/pos_token_frac": float((valid > 0).float().mean()) if valid.numel() else 0.0,
            "batch/frac_positive": float(correct.float().mean()),
        }

    @torch.no_grad()
    def likelihood_displacement(self, batch: RolloutBatch, old_logp: torch.Tensor) -> float:
        """Mean per-token change of log pi(y+|x) over the positive responses, after the update."""
        pos = batch.correct.nonzero().flatten()
        if len(pos) == 0:
            return float("nan")
        change, count = 0.0, 0.0
        self.engine.eval()
        try:
            for i in range(0, len(pos), self.cfg.trainer.micro_batch_size):
                rows = pos[i:i + self.cfg.trainer.micro_batch_size]
                logp, _, mask, _ = self._forward(self.engine, [batch.prompt_ids[r] for r in rows.tolist()],
                                                 [batch.response_ids[r] for r in rows.tolist()])
                w = logp.shape[1]
                change += float(((logp.float().cpu() - old_logp[rows, :w]) * mask.cpu()).sum())
                count += float(mask.sum())
        finally:
            self.engine.train()
        return change / max(count, 1.0)

    # ------------------------------------------------------------------ weights & checkpoints
    def named_weights(self):
        """Full (gathered) weights for the rollout engine and for saving."""
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return [(k, v.detach().clone()) for k, v in module.state_dict().items()]
        return [(k, v.detach()) for k, v in module.state_dict().items()]

    def save_policy(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(out_dir, state_dict=dict(self.named_weights()), safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir

    def save_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        """Policy (safetensors HF folder) + optimizer state + step."""
        self.save_policy(ckpt_dir / "policy")
        opt = self.engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            from safetensors.torch import save_file

            state = opt.state_dict()
            tensors = {f"{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
                       for i, s in state["state"].items() for k, v in s.items()}
            save_file(tensors, str(ckpt_dir / "optimizer.safetensors"),
                      metadata={"param_groups": json.dumps(state["param_groups"])})
        else:
            # ZeRO optimizers keep partitioned state: DeepSpeed's own format, written by this run.
            self.engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="latest", save_latest=False)
        (ckpt_dir / "trainer_state.json").write_text(json.dumps({"step": step}))

    def load_checkpoint(self, ckpt_dir: Path) -> int:
        """Restore optimizer state and the LR schedule position; returns the RL step saved."""
        step = json.loads((ckpt_dir / "trainer_state.json").read_text())["step"]
        opt = self.engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            from safetensors import safe_open
            from safetensors.torch import load_file

            tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
            with safe_open(str(ckpt_dir / "optimizer.safetensors"), "pt") as f:
                groups = json.loads(f.metadata()["param_groups"])
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = value
            opt.load_state_dict({"state": state, "param_groups": groups})
        else:
            # the LR schedule is re-advanced below, the same way for both kinds of checkpoint
            self.engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="latest", load_module_strict=True,
                                        load_lr_scheduler_states=False)
        with warnings.catch_warnings():  # stepping the schedule forward without optimizer steps is the point
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step * self.opt_steps_per_rl_step):
                self.scheduler.step()
        return step
