"""vLLM rollout throughput next to Hugging Face `generate` on the same model and prompts.

    python benchmarks/generation.py [MODEL_DIR] [--prompts 64] [--n 8] [--max-tokens 48] [--profile]

Both sample at temperature 1 with EOS ignored, so both produce exactly
prompts x n x max_tokens tokens; each is timed after one warm-up call, in this
process, one after the other. Without MODEL_DIR the smoke config's warm-started
policy is used (built if needed). --profile instead splits one vLLM rollout call
(stop at EOS) into torch kernels and vLLM's per-request Python bookkeeping.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resrl.environment import set_process_defaults  # noqa: E402

set_process_defaults()  # before vLLM is imported


def vllm_engine(model_dir: str, prompts: list[list[int]], max_tokens: int):
    """The same engine settings as resrl's rollouts on the CPU (RolloutEngine); EAGER=0 compiles."""
    from vllm import LLM

    return LLM(model=model_dir, dtype="float32", kv_cache_memory_bytes=512 << 20,
               enforce_eager=os.environ.get("EAGER", "1") == "1",
               max_model_len=max(len(p) for p in prompts) + max_tokens, max_num_seqs=512, seed=0,
               enable_chunked_prefill=False, max_num_batched_tokens=16384)


def measure(model_dir: str, prompts: list[list[int]], n: int, max_tokens: int, repeats: int = 2,
            fixed_length: bool = True) -> dict:
    """Tokens/s of both generators. fixed_length: EOS ignored, every sample max_tokens long;
    otherwise rollout settings (stop at EOS) and only tokens up to EOS count."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = vllm_engine(model_dir, prompts, max_tokens)
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=fixed_length, seed=0)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs, sp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        out = llm.generate(reqs, sp, use_tqdm=False)
    vllm_s = (time.perf_counter() - t) / repeats
    vllm_tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
    del llm

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = model.generation_config.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, num_return_sequences=n, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens if fixed_length else 0, pad_token_id=pad,
                                  eos_token_id=model.generation_config.eos_token_id)
    hf()
    t = time.perf_counter()
    for _ in range(repeats):
        g = hf()
    hf_s = (time.perf_counter() - t) / repeats
    new = g[:, width:]
    eos = model.generation_config.eos_token_id
    is_eos = (new == eos).int()
    # tokens up to and including the first EOS (all of them if there is none)
    hf_tokens = int(torch.where(is_eos.any(1), is_eos.argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1])).sum())
    return {"vllm_tokens": vllm_tokens, "hf_tokens": hf_tokens, "vllm_s": vllm_s, "hf_s": hf_s,
            "vllm_tok_s": vllm_tokens / vllm_s, "hf_tok_s": hf_tokens / hf_s,
            "ratio": (vllm_tokens / vllm_s) / (hf_tokens / hf_s),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def profile_vllm(model_dir: str, prompts: list[list[int]], n: int, max_tokens: int) -> None:
    """Where a vLLM `generate` call spends its time, under cProfile (warm engine)."""
    import cProfile
    import pstats

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = vllm_engine(model_dir, prompts, max_tokens)
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs, sp, use_tqdm=False)  # warm-up
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    out = llm.generate(reqs, sp, use_tqdm=False)
    prof.disable()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    kernels = sum(v[2] for k, v in stats.items() if k[0] == "~" and "torch" in k[2])

    def cumulative(suffix: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[0].endswith(suffix) and k[2] in
                   ("schedule", "update_from_output", "process_outputs"))
    tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
    print(f"vLLM generate under cProfile: {total:.2f} s for {tokens} tokens")
    print(f"  torch kernels (own time)           {kernels:.2f} s")
    print(f"  scheduler (schedule + update)      {cumulative('scheduler.py'):.2f} s")
    print(f"  output processing                  {cumulative('output_processor.py'):.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--config", default="conf/default.yaml")
    ap.add_argument("--profile", action="store_true", help="profile one vLLM call instead of comparing")
    args = ap.parse_args()
    from resrl.config import load_config
    from resrl.data import load_prepared
    from resrl.prepare import prepare

    cfg = load_config(args.config if args.config != "conf/default.yaml" else None)
    prepared = prepare(cfg)
    model_dir = args.model_dir or prepared["policy_dir"]
    test = load_prepared(prepared["dataset_dir"])["test"]
    prompts = [test[i]["prompt_token_ids"] for i in range(min(args.prompts, len(test)))]
    print(f"model {model_dir}, {len(prompts)} prompts x {args.n} samples, max {args.max_tokens} new tokens")
    if args.profile:
        return profile_vllm(model_dir, prompts, args.n, args.max_tokens)
    for fixed in (False, True):
        r = measure(model_dir, prompts, args.n, args.max_tokens, fixed_length=fixed)
        label = "fixed length (EOS ignored)" if fixed else "rollout (stop at EOS)     "
        print(f"{label}  vLLM {r['vllm_tok_s']:8.0f} tok/s ({r['vllm_tokens']} tok, {r['vllm_s']:.2f} s) | "
              f"HF generate {r['hf_tok_s']:8.0f} tok/s ({r['hf_tokens']} tok, {r['hf_s']:.2f} s) | "
              f"vLLM/HF {r['ratio']:.2f}x  [{r['params_m']:.2f}M params]")


if __name__ == "__main__":
    main()
