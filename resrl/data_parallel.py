"""The policy update over the data-parallel ranks of one run (`trainer.num_processes`).

Every rank holds one DeepSpeed data-parallel replica (ZeRO 0-3) of the policy and is given the
whole gathered rollout batch. It scores its own prompt groups (the ResRL weights stay per group)
and the scores are gathered; each PPO mini-batch is the same as on one rank and is split across
the ranks; the token coefficients are those of the whole mini-batch, so the ranks' losses sum to
the one-rank loss, and each is multiplied by the world size because DeepSpeed averages gradients
over the ranks. Every rank runs the same number of forward/backward passes (ZeRO-3 gathers
parameters in each; ZeRO-2 reduces each micro-batch's gradients): a rank with fewer rows pads
with zero-loss passes.

`DataParallelTrainer` only overrides `PolicyTrainer`'s hooks (resrl/trainer.py, "the ranks'
hooks"); the step itself is written once. Launch, rank identity and rank 0's command channel
are in resrl/ranks.py.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist

from resrl.algorithms import ResidualStats
from resrl.ranks import group_share, world
from resrl.trainer import PolicyTrainer, Scored, evaluating, group_chunks, micro_batches


def make_trainer(model_path: str, cfg, *, rollout_batch_size: int) -> PolicyTrainer:
    """The trainer for this process: the plain one for one rank, the data-parallel one otherwise."""
    if world()[1] == 1:
        return PolicyTrainer(model_path, cfg, rollout_batch_size=rollout_batch_size)
    return DataParallelTrainer(model_path, cfg, rollout_batch_size=rollout_batch_size)


class DataParallelTrainer(PolicyTrainer):
    """PolicyTrainer over the ranks of a torch.distributed world (see the module's docstring)."""

    def __init__(self, model_path: str, cfg, *, rollout_batch_size: int):
        self.rank, self.world_size = world()
        per_rank = max(cfg.trainer.mini_batches, math.ceil(rollout_batch_size / self.world_size))
        super().__init__(model_path, cfg, rollout_batch_size=per_rank)

    def _group_rows(self, group_ids: torch.Tensor) -> list[torch.Tensor]:
        """Rows of each rank's groups (groups in order of first appearance, split contiguously)."""
        order = list(dict.fromkeys(group_ids.tolist()))
        out = []
        for r in range(self.world_size):
            mine = {order[i] for i in group_share(len(order), r, self.world_size)}
            out.append(torch.tensor([i for i, g in enumerate(group_ids.tolist()) if g in mine], dtype=torch.long))
        return out

    # -------------------------------------------------------------- scoring: share the groups, gather the parts
    def _score_rows(self, batch) -> torch.Tensor:
        return self._group_rows(batch.group_ids)[self.rank]

    def _join_scores(self, batch, rows, part: Scored | None) -> Scored:
        mbs = self.cfg.trainer.micro_batch_size
        counts = [len(list(group_chunks(batch.group_ids[r], mbs))) if len(r) else 0
                  for r in self._group_rows(batch.group_ids)]
        with evaluating(self.engine):  # as many passes as the busiest rank
            for _ in range(max(counts) - counts[self.rank]):
                self._idle_scoring_pass(batch)
        mine = None if part is None else {"rows": rows, "logp": part.logp, "entropy": part.entropy,
                                          "weights": part.token_weights, "ref": part.ref_logp,
                                          "residual": part.residual_weights, "stats": part.stats}
        parts = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        B, T = len(batch), batch.response_mask().shape[1]
        logp, entropy, weights = torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T)
        ref = torch.zeros(B, T) if self.ref_model is not None else None
        residual = None
        stats = []
        for p in parts:
            if p is None:
                continue
            rows, t = p["rows"], p["logp"].shape[1]
            logp[rows, :t], entropy[rows, :t], weights[rows, :t] = p["logp"], p["entropy"], p["weights"]
            if ref is not None:
                ref[rows, :t] = p["ref"]
            if p["residual"] is not None:
                residual = torch.ones(B, T) if residual is None else residual
                residual[rows, :t] = p["residual"]
            stats.append(p["stats"])
        return Scored(logp, entropy, weights, ref, ResidualStats.merge(stats), residual)

    # -------------------------------------------------------------- passes: split the rows, pad to the busiest rank
    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of `rows` in micro-batches, padded with empty ones to the busiest rank's count."""
        if not len(rows):
            return []
        mbs = self.cfg.trainer.micro_batch_size
        shares = list(torch.tensor_split(rows, self.world_size))
        n = max(math.ceil(len(s) / mbs) for s in shares)
        mine = micro_batches(shares[self.rank], mbs)
        return mine + [rows[:0]] * (n - len(mine))

    # -------------------------------------------------------------- sums over the ranks
    def _sum_over_ranks(self, total: float, sums: Counter) -> tuple[float, Counter]:
        keys = list(sums)  # the same keys, in the same order, on every rank (trainer.summed_keys)
        reduced = self._add_over_ranks(torch.tensor([total, *(sums[k] for k in keys)], dtype=torch.float64))
        return float(reduced[0]), Counter(dict(zip(keys, reduced[1:].tolist())))

    def _add_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values)
        return values

    def _sync(self) -> None:
        dist.barrier()
