"""A short supervised warm-start on worked solutions, so the RL phase starts from a
policy that solves some prompts (both positive and negative rollouts exist).

Plain PyTorch on purpose: it runs once, is cached by its config, and is not part of
the algorithm under study.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from resrl import interrupts
from resrl.published import RECORD
from resrl.errors import ConfigError


def warm_start(base_dir, out_dir, train_rows, cfg, progress: bool = True) -> dict[str, float]:
    """Fine-tune `base_dir` on prompt + solution (loss on the solution) into `out_dir`."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = cfg.warmstart
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    eos = tokenizer.eos_token_id
    examples = [(r["prompt_token_ids"], tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [eos])
                for r in train_rows if r["solution"]]
    if not examples:
        raise ConfigError("warmstart.enabled=true but the training data has no worked solutions; "
                          "set warmstart.enabled=false")
    t0 = time.time()
    torch.manual_seed(cfg.base_seed)
    rng = random.Random(cfg.base_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    # linear warm-up, then linear decay to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / w.warmup_steps) * max(0.1, 1.0 - s / w.steps))
    losses = []
    bar = tqdm(range(w.steps), desc="warm-start", disable=not progress, mininterval=2.0)
    for _ in bar:
        interrupts.check()  # see resrl/interrupts.py
        batch = [examples[rng.randrange(len(examples))] for _ in range(w.batch_size)]
        L = max(len(p) + len(s) for p, s in batch)
        ids = torch.full((len(batch), L), eos, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        attn = torch.zeros(len(batch), L, dtype=torch.long)
        for i, (p, s) in enumerate(batch):
            ids[i, :len(p) + len(s)] = torch.tensor(p + s)
            labels[i, len(p):len(p) + len(s)] = torch.tensor(s)
            attn[i, :len(p) + len(s)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-20:]
    final_loss = sum(tail) / len(tail)
    (Path(out_dir) / RECORD).write_text(json.dumps(
        {"final_loss": final_loss, "steps": w.steps, "seconds": round(time.time() - t0, 1)}, indent=2) + "\n")
    return {"warmstart/final_loss": final_loss}
