"""A batch of scored rollouts, its on-disk form (safetensors), and its tensor layout.

Layout for the trainer: prompts left-padded to P, responses right-padded to T, so
every response starts at column P; the logits (and hidden states) that produce
response token t sit at column P - 1 + t.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from resrl.rewards import is_correct


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]      # one entry per sample (repeated across a group)
    response_ids: list[list[int]]
    rewards: torch.Tensor            # (B,) float, after reward shaping
    scores: torch.Tensor             # (B,) float, the verifier's raw score
    group_ids: torch.Tensor          # (B,) long: samples of one prompt share an id
    texts: list[str] = field(default_factory=list)
    # the sampler's log-prob of each response token (aligned with response_ids; NaN where it
    # has none, e.g. an empty response replaced by EOS); None when the sampler gave none
    sampler_logp: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def correct(self) -> torch.Tensor:
        """A sample is positive when its verifier score is at least 0.5."""
        return is_correct(self.scores)

    def select(self, rows) -> "RolloutBatch":
        rows = [int(r) for r in rows]
        return RolloutBatch([self.prompt_ids[r] for r in rows], [self.response_ids[r] for r in rows],
                            self.rewards[rows], self.scores[rows], self.group_ids[rows],
                            [self.texts[r] for r in rows] if self.texts else [],
                            [self.sampler_logp[r] for r in rows] if self.sampler_logp is not None else None)

    def response_mask(self) -> torch.Tensor:
        T = max((len(r) for r in self.response_ids), default=0)
        lengths = torch.tensor([len(r) for r in self.response_ids])
        return torch.arange(T)[None, :] < lengths[:, None]

    def sampler_logp_tensor(self) -> torch.Tensor | None:
        """(B, T) sampler log-probs, NaN outside the responses (and where the sampler gave none)."""
        if self.sampler_logp is None:
            return None
        mask = self.response_mask()
        out = torch.full(mask.shape, float("nan"))
        for i, lp in enumerate(self.sampler_logp):
            out[i, :len(lp)] = torch.tensor(lp, dtype=torch.float)
        return out

    # ------------------------------------------------------------------ disk
    def save(self, path: Path) -> Path:
        def flat(seqs):
            return (torch.tensor([t for s in seqs for t in s], dtype=torch.long),
                    torch.tensor([len(s) for s in seqs], dtype=torch.long))
        p_flat, p_len = flat(self.prompt_ids)
        r_flat, r_len = flat(self.response_ids)
        tensors = {"prompt_flat": p_flat, "prompt_len": p_len, "response_flat": r_flat, "response_len": r_len,
                   "rewards": self.rewards.float(), "scores": self.scores.float(), "group_ids": self.group_ids.long()}
        if self.sampler_logp is not None:
            tensors["sampler_logp_flat"] = torch.tensor([x for s in self.sampler_logp for x in s], dtype=torch.float)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"texts": json.dumps(self.texts)})
        return path

    @classmethod
    def load(cls, path: Path) -> "RolloutBatch":
        from safetensors import safe_open

        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            texts = json.loads(f.metadata().get("texts", "[]"))

        def unflat(flat, lengths):
            return [s.tolist() for s in torch.split(flat, lengths.tolist())]
        sampler = unflat(t["sampler_logp_flat"], t["response_len"]) if "sampler_logp_flat" in t else None
        return cls(unflat(t["prompt_flat"], t["prompt_len"]), unflat(t["response_flat"], t["response_len"]),
                   t["rewards"], t["scores"], t["group_ids"], texts, sampler)


@dataclass
class SamplerStates:
    """What the Hugging Face sampler kept from drawing a step's batch, for the trainer to skip its
    scoring pass (`PolicyTrainer.sampler_scores_apply`): per batch row, the (len, H) hidden states
    of `layer` that produced its tokens, None for a row without them (an empty response), or no
    states at all (`hidden` None) when the algorithm weights no tokens. Lives in memory only: a
    resumed run's first update scores its batch itself."""
    step: int
    layer: int | None
    hidden: list[torch.Tensor | None] | None


def padded(rows: list[list[int]], pad_id: int, *, left: bool, width: int | None = None):
    """Token-id rows as one (B, width) long tensor padded with `pad_id` on the left (prompts, so
    their last tokens line up) or on the right, and its attention mask; width: the longest row's."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            attn[i, cols] = 1
    return ids, attn


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad responses: input_ids, attention_mask, position_ids, response_mask."""
    prompts, prompt_attn = padded(prompt_ids, pad_id, left=True)
    T = max(max((len(r) for r in response_ids), default=0), 1)
    responses, response_attn = padded(response_ids, pad_id, left=False, width=T)
    ids, attn = torch.cat([prompts, responses], dim=1), torch.cat([prompt_attn, response_attn], dim=1)
    position_ids = (attn.cumsum(dim=1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids,
            "response_mask": response_attn.bool(), "prompt_width": prompts.shape[1]}
