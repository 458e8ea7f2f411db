"""Feasibility of data-parallel ranks on this stack (issue #10): DeepSpeed + one vLLM engine per rank.

    python benchmarks/dp_feasibility.py prepare DIR                # a tiny Qwen2 folder in DIR/model
    torchrun --nproc_per_node=N benchmarks/dp_feasibility.py run DIR --zero S [--backend B] [--order O]
    python benchmarks/dp_feasibility.py compare DIR/a.pt DIR/b.pt

`run`, in every rank: torch.distributed (gloo) through deepspeed.init_distributed, an in-process
vLLM engine (`--backend external_launcher` shares the ranks' process group; `uni` is vLLM's
default single-process executor), a DeepSpeed engine at ZeRO stage S, two optimizer steps on a
fixed global batch of which each rank takes its whole groups (loss normalised by the global token
count, times the world size to undo DeepSpeed's gradient averaging), a weight sync into the rank's
vLLM engine, and the log-probs of a fixed sequence from every rank's engine. Rank 0 writes the
final weights to DIR/w{N}_z{S}.pt and prints timings; `compare` prints the largest difference.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

GROUPS, N = 6, 4  # prompt groups in the global batch, samples per group


def prepare(out: Path) -> None:
    from omegaconf import OmegaConf

    from resrl.embedded import save_embedded_base

    tiny = OmegaConf.create(dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                                 num_kv_heads=1, max_positions=128))
    save_embedded_base(out / "model", tiny, seed=0)
    print(out / "model")


def make_batch(vocab=250):
    g = torch.Generator().manual_seed(0)
    rows = []
    for grp in range(GROUPS):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(N):
            length = int(torch.randint(2, 12, (1,), generator=g))
            resp = torch.randint(0, vocab, (length,), generator=g).tolist()
            adv = 1.0 if (i + grp) % 3 == 0 else -0.5
            rows.append((grp, prompt, resp, adv))
    return rows


def my_groups(rank: int, world: int) -> list[int]:
    """Contiguous whole groups per rank; the first GROUPS % world ranks take one more."""
    base, extra = divmod(GROUPS, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def seq_logp(model, prompt, resp):
    ids = torch.tensor([prompt + resp])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    P = len(prompt)
    return logits[P - 1:-1].log_softmax(-1).gather(-1, ids[0, P:, None]).squeeze(-1)


def run(out: Path, zero: int, backend: str, order: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model_dir = str(out / "model")
    times = {}

    def make_llm():
        from vllm import LLM

        t = time.time()
        kw = dict(model=model_dir, dtype="float32", seed=0, max_model_len=128, enforce_eager=True,
                  kv_cache_memory_bytes=64 << 20, enable_chunked_prefill=False, max_num_batched_tokens=8192,
                  enable_prefix_caching=True, logprobs_mode="processed_logprobs")
        if backend != "default":
            kw["distributed_executor_backend"] = backend
        llm = LLM(**kw)
        times["vllm_start_s"] = time.time() - t
        return llm

    llm = None
    if order == "vllm-first":
        llm = make_llm()
    t = time.time()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    times["init_distributed_s"] = time.time() - t
    print(f"[rank {rank}] world {dist.get_world_size()} after init_distributed", flush=True)
    if llm is None:
        llm = make_llm()
    print(f"[rank {rank}] vLLM up; default group size {dist.get_world_size()}", flush=True)

    rows = make_batch()
    mine = set(my_groups(rank, world))
    my_rows = [r for r in rows if r[0] in mine]
    global_tokens = sum(len(r[2]) for r in rows)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
    t = time.time()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    times["deepspeed_init_s"] = time.time() - t

    # Every rank runs the same number of micro-batches (ZeRO-3 gathers parameters in every forward):
    # a rank with fewer rows pads with zero-loss passes.
    micro = max(len([r for r in rows if r[0] in set(my_groups(k, world))]) for k in range(world))
    scale = world if os.environ.get("DPF_NO_SCALE") != "1" else 1
    grad_norms = []
    t = time.time()
    for opt_step in range(2):
        for i in range(micro):
            last = i == micro - 1
            if i < len(my_rows):
                _, prompt, resp, adv = my_rows[i]
                lp = seq_logp(engine, prompt, resp)
                loss = -(adv * lp).sum() / global_tokens * scale  # global token mean; DeepSpeed averages
            else:
                lp = seq_logp(engine, rows[0][1], rows[0][2])
                loss = lp.sum() * 0.0
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss, scale_wrt_gas=False)
            if last and zero == 0:  # plain optimizer: the (all-reduced) gradients sit on the parameters
                grad_norms.append(float(torch.stack([p.grad.norm() for p in engine.module.parameters()]).norm()))
            engine.step()
        if zero:
            grad_norms.append(float(engine.get_global_grad_norm()))
    times["update_s"] = time.time() - t

    t = time.time()
    if zero == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            weights = [(k, v.detach().clone()) for k, v in engine.module.state_dict().items()]
    else:
        weights = [(k, v.detach().clone()) for k, v in engine.module.state_dict().items()]
    t_gather = time.time() - t
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
    llm.reset_prefix_cache()
    times["weight_sync_s"] = time.time() - t
    times["gather_s"] = t_gather

    # log-probs of a fixed sequence from this rank's engine
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    fixed = rows[1][1] + rows[1][2]
    out_v = llm.generate([TokensPrompt(prompt_token_ids=fixed)],
                         SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
    vlp = [d[t].logprob for d, t in zip(out_v.prompt_logprobs[1:], fixed[1:])]
    # this rank's own groups sampled with per-group seeds (different groups per rank)
    params = [SamplingParams(n=N, max_tokens=8, seed=1000 + g) for g in sorted(mine)]
    prompts = [TokensPrompt(prompt_token_ids=rows[g * N][1]) for g in sorted(mine)]
    t = time.time()
    samples = llm.generate(prompts, params, use_tqdm=False)
    times["rollout_s"] = time.time() - t
    sampled = {g: [list(c.token_ids) for c in s.outputs] for g, s in zip(sorted(mine), samples)}

    # the trainer's log-probs of the same sequence (full weights)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.load_state_dict(dict(weights))
    with torch.no_grad():
        tlp = seq_logp(ref, [fixed[0]], fixed[1:]).tolist()

    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "vllm_logp": vlp, "trainer_logp": tlp, "groups": sorted(mine),
                                      "sampled": sampled, "times": times})
    if rank == 0:
        torch.save(dict(weights), out / f"w{world}_z{zero}{os.environ.get('DPF_TAG', '')}.pt")
        v0 = torch.tensor(gathered[0]["vllm_logp"])
        report = {"world": world, "zero": zero, "backend": backend, "order": order,
                  "max_vllm_logp_diff_across_ranks": max(float((torch.tensor(g["vllm_logp"]) - v0).abs().max())
                                                         for g in gathered),
                  "max_vllm_vs_trainer_logp_diff": float((v0 - torch.tensor(gathered[0]["trainer_logp"])).abs().max()),
                  "groups_per_rank": [g["groups"] for g in gathered], "grad_norms": grad_norms,
                  "times_per_rank": [g["times"] for g in gathered]}
        print("REPORT " + json.dumps(report), flush=True)
        (out / f"report_w{world}_z{zero}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    # closing the engine: does the process group survive?
    t = time.time()
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    print(f"[rank {rank}] vLLM closed in {time.time() - t:.2f}s; dist initialized: {dist.is_initialized()}",
          flush=True)


def compare(a: Path, b: Path) -> None:
    wa, wb = torch.load(a), torch.load(b)
    diffs = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    moved = max(float((wa[k] - torch.load(a.parent / "w0.pt")[k]).abs().max()) for k in wa) \
        if (a.parent / "w0.pt").exists() else float("nan")
    print(json.dumps({"max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                      "max_update": moved}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(Path(sys.argv[2]))
    elif cmd == "run":
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("dir")
        p.add_argument("--zero", type=int, default=0)
        p.add_argument("--backend", default="external_launcher")
        p.add_argument("--order", default="ds-first", choices=["ds-first", "vllm-first"])
        a = p.parse_args(sys.argv[2:])
        run(Path(a.dir), a.zero, a.backend, a.order)
    elif cmd == "compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
