"""One rank of the data-parallel tests (tests/test_ranks.py), started by torchrun.

    torchrun --nproc_per_node=W tests/dp_ranks.py update MODEL_DIR OUT_DIR ZERO [key=value ...]
        one RL update (2 PPO mini-batches) of the real trainer on a fixed batch; rank 0 writes
        OUT_DIR/weights.pt and metrics.json; then every rank syncs the new weights into its own
        vLLM engine and scores a fixed sequence: OUT_DIR/logprobs.json holds every rank's log-probs.
    torchrun --nproc_per_node=W tests/dp_ranks.py session CONFIG_JSON PREPARED_JSON OUT_DIR
        the real session protocol: rank 0 leads (open, rollout, update, save_checkpoint, close), the
        others follow; OUT_DIR/session.json holds each rank's prompt share and the gathered batch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

N = 4


def make_batch(groups: int, seed=0, vocab=250):
    from resrl.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses, scores, gids = [], [], [], []
    for grp in range(groups):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(N):
            length = int(torch.randint(2, 12, (1,), generator=g))
            responses.append(torch.randint(0, vocab, (length,), generator=g).tolist())
            prompts.append(prompt)
            scores.append(float((i + grp) % 3 == 0))
            gids.append(grp)
    s = torch.tensor(scores)
    return RolloutBatch(prompts, responses, s.clone(), s, torch.tensor(gids))


def update(model_dir: str, out: Path, zero: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    from resrl import ranks
    from resrl.config import load_config
    from resrl.data_parallel import make_trainer
    from resrl.rollout import RolloutEngine

    rank, size = ranks.world()
    cfg = load_config(None, ["rollout.prompts_per_step=6", f"rollout.n={N}", "trainer.device=cpu",
                             "trainer.lr=1e-3", "trainer.warmup_steps=1", "algorithm.rank=3",
                             "trainer.mini_batches=2", "trainer.micro_batch_size=4", f"trainer.zero_stage={zero}",
                             "algorithm.diagnostics_every=1",  # the step logs lld, compared across ranks
                             f"trainer.num_processes={size}", "rollout.kv_cache_gb=0.05", *overrides])
    groups = cfg.rollout.prompts_per_step
    ranks.start("cpu")
    engine = RolloutEngine.for_run(model_dir, cfg, longest_prompt=16)
    trainer = make_trainer(model_dir, cfg, rollout_batch_size=groups * N)
    batch = make_batch(groups)
    metrics = trainer.train_step(batch, step=1)
    weights = trainer.named_weights()  # every rank (a collective under ZeRO-3)
    engine.load_weights(weights)
    fixed = batch.prompt_ids[5] + batch.response_ids[5]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    got = engine.llm.generate([TokensPrompt(prompt_token_ids=fixed)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logp = [d[t].logprob for d, t in zip(got.prompt_logprobs[1:], fixed[1:])]
    parts = [None] * size
    dist.all_gather_object(parts, logp)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in weights}, out / "weights.pt")
        (out / "metrics.json").write_text(json.dumps(metrics))
        (out / "logprobs.json").write_text(json.dumps(parts))
        # rank 0 alone samples (as in an evaluation) while the others wait: no collective in generate
        engine.generate([fixed[:4]], n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4, seed=0)
    dist.barrier()
    engine.close()


def session(config_json: str, prepared_json: str, out: Path) -> None:
    from resrl import ranks
    from resrl.config import from_dict
    from resrl.session import close_session, follow, open_session

    rank, size = ranks.world()
    from resrl.rollout import HFRolloutEngine, RolloutEngine

    asked = []

    def recording(generate):
        def record(self, prompt_token_ids, **kwargs):  # which prompts this rank's engine sampled
            asked.extend(list(p) for p in prompt_token_ids)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{rank}_prompts.json").write_text(json.dumps(asked))
            return generate(self, prompt_token_ids, **kwargs)
        return record
    for cls in (RolloutEngine, HFRolloutEngine):  # whichever rollout.backend the config picks
        cls.generate = recording(cls.generate)
    ranks.start("cpu")
    if rank > 0:
        follow()
        return
    cfg = from_dict(json.loads(Path(config_json).read_text()))
    prepared = json.loads(Path(prepared_json).read_text())
    s = open_session("dp-test", cfg, prepared, prepared["policy_dir"], None)
    batch, metrics = s.rollout(1)
    idx = s.prompt_indices(1)
    upd = s.update(1, batch)
    s.save_checkpoint(out / "checkpoint", 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "session.json").write_text(json.dumps({
        "prompt_indices": idx,
        "shares": [list(ranks.group_share(len(idx), r, size)) for r in range(size)],
        "batch_prompts": [p for p in batch.prompt_ids],
        "batch_group_ids": batch.group_ids.tolist(),
        "responses": batch.response_ids,
        "train_prompts": [s.train_set[i]["prompt_token_ids"] for i in idx],
        "metrics": {**metrics, **upd}}))
    close_session("dp-test")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "update":
        update(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    elif mode == "session":
        session(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
