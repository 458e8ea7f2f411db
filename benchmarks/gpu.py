"""RL steps of resrl's own rollout engine and trainer on GPUs: 1 GPU, then all GPUs.

    python benchmarks/gpu.py                       # Qwen2-0.5B and -1.5B shapes, bf16, 1 GPU and all GPUs
    python benchmarks/gpu.py --sizes 0.5b --steps 4 --prompts 64 --samples 8 --max-tokens 512
    python benchmarks/gpu.py --device cpu --sizes tiny --steps 2     # the same code path on the CPU (checks it)

For each model size it builds a randomly initialised Qwen2 of that shape in --work (nothing is
downloaded), then for each rank count (1, and every visible GPU when there are more) starts the
ranks with torchrun; each rank holds resrl's RolloutEngine (vLLM, `external_launcher` over the
ranks' process group when there are several) and its DeepSpeed trainer, exactly as a run does.
A step: each rank samples its share of the prompt groups (random prompts, EOS ignored so every
sample is --max-tokens long), rewards are seeded coin flips, then one update on the gathered
batch and the weight sync into every rank's engine. The first step is a warm-up; the table shows
the mean of the others:

- rollout tok/s: generated tokens of all ranks / the slowest rank's rollout time;
- update tok/s: prompt + response tokens of the batch / the update time (scoring, PPO, LLD);
- sync s: gathering the weights and loading them into vLLM;
- peak GiB: the largest device memory in use on any rank (total - free), and torch's peak reserved;
- logp gap: mean |trainer log-prob - sampler log-prob| of the sampled tokens before the update.

The random model's vocabulary is Qwen2's (151936) while the byte-level tokenizer has 259 tokens:
samples are token ids and are never detokenized.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Qwen2-0.5B / Qwen2-1.5B (their config.json); "tiny" checks the script on a CPU
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024),
}


def build_model(size: str, out: Path, max_positions: int) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from resrl.embedded import build_tokenizer, save_model_folder

    folder = out / f"qwen2-{size}-random"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    tok = build_tokenizer()
    eos = tok.eos_token_id
    config = Qwen2Config(**SHAPES[size], max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, use_sliding_window=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return save_model_folder(folder, model, tok)


# ---------------------------------------------------------------------- one rank
def worker(a) -> None:
    import random

    import torch
    import torch.distributed as dist
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from resrl import ranks
    from resrl.data_parallel import make_trainer
    from resrl.batch import RolloutBatch
    from resrl.config import load_config
    from resrl.rollout import RolloutEngine

    rank, size = ranks.world()
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cfg = load_config(None, [
        f"model.path={a.model}", f"model.dtype={'bfloat16' if cuda else 'float32'}", f"trainer.device={a.device}",
        f"trainer.num_processes={size}", f"trainer.zero_stage={a.zero}", f"rollout.prompts_per_step={a.prompts}",
        f"rollout.n={a.samples}", f"rollout.max_tokens={a.max_tokens}", f"eval.max_tokens={a.max_tokens}",
        f"rollout.gpu_memory_utilization={a.vllm_memory}", f"rollout.enforce_eager={str(not cuda).lower()}",
        "rollout.kv_cache_gb=0.5", f"trainer.micro_batch_size={a.micro_batch}", "trainer.mini_batches=1",
        "warmstart.enabled=false", "trainer.warmup_steps=1"])
    ranks.start(a.device)

    def peak() -> float:
        if not cuda:
            return float("nan")
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    engine = RolloutEngine.for_run(a.model, cfg, longest_prompt=a.prompt_len)
    trainer = make_trainer(a.model, cfg, rollout_batch_size=a.prompts * a.samples)
    gen = random.Random(0)
    vocab = 256  # prompt ids from the byte range: every id the tokenizer knows
    prompts = [[gen.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
    share = ranks.group_share(a.prompts, rank, size)
    rows, device_peak = [], (0.0 if cuda else float("nan"))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for step in range(1, a.steps + 1):
        sync()
        t0 = time.time()
        params = [SamplingParams(n=a.samples, temperature=1.0, max_tokens=a.max_tokens, ignore_eos=True,
                                 seed=step * 10_007 + g, logprobs=0, detokenize=False) for g in share]
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=prompts[g]) for g in share], params, use_tqdm=False)
        mine = [(g, list(c.token_ids), [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)])
                for g, o in zip(share, outs) for c in o.outputs]
        sync()
        rollout_s = time.time() - t0
        device_peak = max(device_peak, peak())
        parts = [None] * size
        if size > 1:
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        samples = [s for p in parts for s in p]
        coin = random.Random(step)
        scores = torch.tensor([float(coin.random() < 0.5) for _ in samples])
        batch = RolloutBatch([prompts[g] for g, _, _ in samples], [ids for _, ids, _ in samples], scores.clone(),
                             scores, torch.tensor([g for g, _, _ in samples]), [], [lp for _, _, lp in samples])
        sync()
        t1 = time.time()
        metrics = trainer.train_step(batch, step)
        sync()
        t2 = time.time()
        engine.load_weights(trainer.named_weights())
        sync()
        t3 = time.time()
        device_peak = max(device_peak, peak())
        generated = sum(len(ids) for _, ids, _ in samples)
        trained = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
        times = [None] * size
        if size > 1:
            dist.all_gather_object(times, rollout_s)
        else:
            times = [rollout_s]
        rows.append({"step": step, "rollout_s": max(times), "update_s": t2 - t1, "sync_s": t3 - t2,
                     "rollout_tok_s": generated / max(times), "update_tok_s": trained / (t2 - t1),
                     "logp_gap": metrics.get("sampler_logp_diff_mean", float("nan"))})
    peaks = [None] * size
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    if size > 1:
        dist.all_gather_object(peaks, (device_peak, reserved))
    else:
        peaks = [(device_peak, reserved)]
    if rank == 0:
        Path(a.result).write_text(json.dumps({"rows": rows, "peak_device_gib": max(p[0] for p in peaks),
                                              "peak_torch_reserved_gib": max(p[1] for p in peaks)}))
    if size > 1:
        dist.barrier()
    engine.close()


# ---------------------------------------------------------------------- the command
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b"], choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--ranks", nargs="+", type=int, help="rank counts (default: 1 and all GPUs)")
    p.add_argument("--steps", type=int, default=4, help="RL steps per setting (the first is a warm-up)")
    p.add_argument("--prompts", type=int, default=32, help="prompt groups per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the group size)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--zero", type=int, default=1, help="DeepSpeed ZeRO stage (bf16 keeps fp32 masters from 1 up)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM's share of each GPU (weights + KV cache)")
    p.add_argument("--work", default=str(ROOT / ".cache" / "gpu-bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    if a.worker:
        worker(a)
        return 0
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device is visible (use --device cpu --sizes tiny to check the script)",
              file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if a.device == "cuda" else 2
    ranks = a.ranks or sorted({1, gpus})
    work = Path(a.work)
    table = []
    for size in a.sizes:
        model = build_model(size, work, max_positions=a.prompt_len + a.max_tokens + 64)
        for n in ranks:
            if a.prompts < n:
                print(f"skip {size} x {n} ranks: fewer prompt groups ({a.prompts}) than ranks")
                continue
            result = work / f"result-{size}-{n}.json"
            result.unlink(missing_ok=True)
            from resrl.environment import free_port

            env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR=a.device)
            if a.device == "cpu":
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n)))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
                   "--worker", "--model", str(model), "--result", str(result), "--device", a.device,
                   "--steps", str(a.steps), "--prompts", str(a.prompts), "--samples", str(a.samples),
                   "--prompt-len", str(a.prompt_len), "--max-tokens", str(a.max_tokens),
                   "--micro-batch", str(a.micro_batch), "--zero", str(a.zero), "--vllm-memory", str(a.vllm_memory)]
            print(f"== {size}, {n} rank(s): {' '.join(cmd[2:8])} ...", flush=True)
            t0 = time.time()
            code = subprocess.call(cmd, env=env)
            if code != 0 or not result.exists():
                print(f"{size} x {n} ranks failed (exit {code})", file=sys.stderr)
                table.append((size, n, None, time.time() - t0))
                continue
            table.append((size, n, json.loads(result.read_text()), time.time() - t0))
    print()
    head = ("model", "ranks", "rollout tok/s", "update tok/s", "sync s", "peak GiB (device / torch)", "logp gap",
            "wall s")
    print(" | ".join(head))
    for size, n, res, wall in table:
        if res is None:
            print(f"{size} | {n} | failed | | | | | {wall:.0f}")
            continue
        rows = res["rows"][1:] or res["rows"]  # the first step warms up

        def mean(key):
            return statistics.mean(r[key] for r in rows)
        print(f"{size} | {n} | {mean('rollout_tok_s'):.0f} | {mean('update_tok_s'):.0f} | {mean('sync_s'):.3f} | "
              f"{res['peak_device_gib']:.1f} / {res['peak_torch_reserved_gib']:.1f} | {mean('logp_gap'):.2e} | "
              f"{wall:.0f}")
    return 0 if all(r is not None for _, _, r, _ in table) else 1


if __name__ == "__main__":
    sys.exit(main())
