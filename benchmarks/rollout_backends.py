"""resrl's two samplers (`rollout.backend`: vllm, hf) on the same policy, prompts and settings.

    python benchmarks/rollout_backends.py [--config conf/default.yaml] [--repeats 3] [key=value ...]

Times `engine.generate` as a run calls it: a training step's rollout (rollout.prompts_per_step x
rollout.n, stop at EOS, with the sampler's log-probs) and an evaluation (eval.num_prompts x
eval.k), each after one warm-up call, with a new seed per repeat; prints seconds per call and
generated tokens per second. Without model.path the embedded warm-started policy is used (built
if needed). Both engines live in this process, built one after the other.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resrl.environment import set_process_defaults  # noqa: E402

set_process_defaults()  # before vLLM is imported


def time_calls(engine, prompts, n, gen, repeats, logprobs):
    engine.generate(prompts, n=n, seed=10_000, logprobs=logprobs, **gen)  # warm-up
    secs, tokens = [], []
    for r in range(repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, n=n, seed=1000 * r, logprobs=logprobs, **gen)
        secs.append(time.perf_counter() - t)
        tokens.append(sum(len(ids) for samples in out for ids, *_ in samples))
    return statistics.median(secs), statistics.median(tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch

    from resrl.config import load_config
    from resrl.data import load_prepared
    from resrl.prepare import prepare
    from resrl.rollout import HFRolloutEngine, RolloutEngine

    cfg = load_config(args.config, args.overrides)
    prepared = prepare(cfg, progress=False)
    data = load_prepared(Path(prepared["dataset_dir"]))
    train, test = data["train"], data["test"]
    r, e = cfg.rollout, cfg.eval
    step_prompts = [train[i]["prompt_token_ids"] for i in range(r.prompts_per_step)]
    n_eval = len(test) if e.num_prompts is None else min(e.num_prompts, len(test))
    eval_prompts = [test[i]["prompt_token_ids"] for i in range(n_eval)]
    longest = max(len(p) for p in step_prompts + eval_prompts)
    print(f"policy {prepared['policy_dir']} | torch threads {torch.get_num_threads()}")
    for name in args.backends.split(","):
        t0 = time.perf_counter()
        cls = {"vllm": RolloutEngine, "hf": HFRolloutEngine}[name]
        engine = cls.for_run(prepared["policy_dir"], cfg, longest)
        start = time.perf_counter() - t0
        roll = time_calls(engine, step_prompts, r.n, dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                                           max_tokens=r.max_tokens), args.repeats, True)
        ev = time_calls(engine, eval_prompts, e.k, dict(temperature=e.temperature, top_p=e.top_p, top_k=-1,
                                                         max_tokens=e.max_tokens), args.repeats, False)
        print(f"{name:>4}: start {start:5.1f} s | step rollout {len(step_prompts)}x{r.n}: {roll[0]:.2f} s "
              f"({roll[1] / roll[0]:7.0f} tok/s) | evaluation {n_eval}x{e.k}: {ev[0]:.2f} s "
              f"({ev[1] / ev[0]:7.0f} tok/s)", flush=True)
        engine.close()


if __name__ == "__main__":
    main()
