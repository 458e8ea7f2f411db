"""Data-parallel ranks of one run (`trainer.num_processes`).

The ranks are processes of one torch.distributed world (gloo on the CPU, nccl on CUDA),
started by torchrun (`resrl train trainer.num_processes=N` starts it on one machine; for
several machines, run torchrun on each, see README). Every rank holds

- a vLLM engine of its own (in-process, `distributed_executor_backend="external_launcher"`,
  so vLLM uses the ranks' process group instead of starting one), which samples the rank's
  share of the step's prompt groups - whole groups, contiguous, in prompt order;
- one DeepSpeed data-parallel replica (ZeRO 0-3) of the policy: every rank gets the whole
  gathered rollout batch, takes its share of each PPO mini-batch, and scales its loss so that
  DeepSpeed's gradient average over the ranks is the gradient of the global loss.

Rank 0 runs the Prefect flow, data preparation, evaluation, MLflow logging and the commits of
`state.json`; the other ranks are followers: `follow()` waits for rank 0's commands
(open / rollout / update / save_checkpoint / close) and runs the same `TrainingSession` methods,
so the collectives of both sides meet.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch

from resrl.environment import set_engine_defaults
from resrl.errors import UserError
from resrl.trainer import _SUMMED, PolicyTrainer, Scored, evaluating, group_chunks


class LaunchError(UserError):
    """A data-parallel set-up that cannot work (launcher, world size, peers)."""


# ---------------------------------------------------------------------- who am I
def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) without a launcher."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_follower() -> bool:
    rank, size = world()
    return size > 1 and rank > 0


def group_share(num_groups: int, rank: int, size: int) -> range:
    """The prompt groups (indices into the step's prompts) that rank `rank` samples:
    contiguous whole groups; the first `num_groups % size` ranks take one more."""
    base, extra = divmod(num_groups, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def check_config(cfg) -> None:
    """The data-parallel part of config validation: ranks against prompt groups (no model is loaded)."""
    from resrl.errors import ConfigError

    t, r = cfg.trainer, cfg.rollout
    n = t.num_processes
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"trainer.num_processes must be an integer >= 1, got {n}.")
    if n > r.prompts_per_step:
        raise ConfigError(f"trainer.num_processes ({n}) is more than rollout.prompts_per_step "
                          f"({r.prompts_per_step}): each rank samples whole prompt groups, so a step has "
                          f"work for at most {r.prompts_per_step} ranks.")


def check_launch(cfg) -> None:
    """The launcher's world must be the one the config asks for."""
    rank, size = world()
    n = cfg.trainer.num_processes
    if "RANK" in os.environ and size != n:
        raise LaunchError(f"trainer.num_processes={n} but the launcher started {size} process(es) "
                          f"(WORLD_SIZE={size}); give torchrun --nnodes x --nproc_per_node = {n}.")
    if n > 1 and "RANK" not in os.environ:
        raise LaunchError(f"trainer.num_processes={n} needs a launcher (torchrun) to start the ranks; "
                          "`resrl train` starts it on one machine, see README for several machines.")


def launcher_command(cfg, argv: list[str]) -> list[str]:
    """torchrun on this machine for `trainer.num_processes` ranks, running `resrl <argv>` in each."""
    import importlib.util
    import sys

    if importlib.util.find_spec("torch.distributed.run") is None:
        raise LaunchError("trainer.num_processes > 1 needs torchrun (torch.distributed.run), "
                          "which this torch does not have.")
    from resrl.environment import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(cfg.trainer.num_processes), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "resrl.cli", *argv]


# ---------------------------------------------------------------------- process group & commands
_CHANNEL = None


def start(device: str):
    """Join the ranks' world (all ranks, before anything else) and open rank 0's command channel.

    Peers that never come are waited for by torchrun's rendezvous, then by torch.distributed's
    own timeout (30 min by default); when that fails, the error is one line naming
    MASTER_ADDR:MASTER_PORT. (No shorter limit of our own: the default group's timeout also
    bounds the step's collectives, which may legitimately wait long on a slow rank.)"""
    global _CHANNEL
    import torch.distributed as dist

    from resrl.deepspeed_setup import init_distributed

    if _CHANNEL is not None:
        return _CHANNEL
    rank, size = world()
    set_engine_defaults()
    if device == "cpu":  # this rank's own share of the machine's cores (resrl/cores.py)
        from resrl import cores

        share = cores.local_rank_share()
        if share is not None:
            cores.apply_share(share)
    try:
        init_distributed(device)
        # A first collective proves every peer is there (init itself may return before that).
        dist.barrier()
    except Exception as exc:  # gloo/nccl/store errors: peers unreachable or never started
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        raise LaunchError(f"rank {rank} of {size} could not reach its peers at {addr}:{port}: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    # Followers wait on this group while rank 0 prepares data and evaluates: a long timeout.
    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    _CHANNEL = _Channel(group)
    return _CHANNEL


def channel():
    return _CHANNEL


class _Channel:
    """Rank 0 broadcasts (command, kwargs); the followers receive them in order."""

    def __init__(self, group):
        self.group = group
        self.open = True

    def send(self, command: str, **kwargs) -> None:
        import torch.distributed as dist

        ending = command in ("close", "exit")
        try:
            if self.open and dist.is_initialized():
                dist.broadcast_object_list([(command, kwargs)], src=0, group=self.group)
        except Exception as exc:  # a follower is gone: a Ctrl-C reached it too, or it failed
            self.open = False
            if ending:  # nothing left to release
                return
            raise LaunchError(f"a data-parallel rank stopped before '{command}' (see its output above): "
                              f"{' '.join(str(exc).split())[:200]}; run the same command again to resume") from None
        if ending:
            self.open = False  # closing vLLM destroys the process group on every rank

    def recv(self) -> tuple[str, dict]:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def lead(command: str, **kwargs) -> None:
    """On rank 0 of several: tell the followers to run `command` too (no-op otherwise)."""
    rank, size = world()
    if size > 1 and rank == 0 and _CHANNEL is not None:
        _CHANNEL.send(command, **kwargs)


def finish() -> None:
    """Rank 0 at exit: release followers still waiting (the session was never opened or closed)."""
    if _CHANNEL is not None and _CHANNEL.open and world()[0] == 0:
        try:
            _CHANNEL.send("exit")
        except Exception:  # a follower already gone: torchrun reports it
            pass


def follow() -> int:
    """A follower rank's whole life: run rank 0's session commands until it closes."""
    from resrl.config import from_dict
    from resrl.session import TrainingSession

    session = None
    while True:
        command, kwargs = _CHANNEL.recv()
        if command == "exit":
            return 0
        if command == "open":
            session = TrainingSession(from_dict(kwargs["config"]), kwargs["prepared"], kwargs["policy_dir"],
                                      kwargs["checkpoint_dir"])
        elif command == "close":
            if session is not None:
                session.close()
            return 0
        else:
            getattr(session, command)(**kwargs)


# ---------------------------------------------------------------------- the trainer
def make_trainer(model_path: str, cfg, *, rollout_batch_size: int):
    """The trainer for this process: the plain one for one rank, the data-parallel one otherwise."""
    if world()[1] == 1:
        return PolicyTrainer(model_path, cfg, rollout_batch_size=rollout_batch_size)
    return DataParallelTrainer(model_path, cfg, rollout_batch_size=rollout_batch_size)


class DataParallelTrainer(PolicyTrainer):
    """PolicyTrainer over the ranks of a torch.distributed world.

    Every rank is given the whole (gathered) rollout batch. It scores its own prompt groups
    (the ResRL weights stay per group) and the scores are gathered; each PPO mini-batch is the
    same as on one rank and is split across the ranks; the token coefficients are those of the
    whole mini-batch, so the ranks' losses sum to the one-rank loss, and each is multiplied by
    the world size because DeepSpeed averages gradients over the ranks. Every rank runs the same
    number of forward/backward passes (ZeRO-3 gathers parameters in each; ZeRO-2 reduces each
    micro-batch's gradients): a rank with fewer rows pads with zero-loss passes.
    """

    def __init__(self, model_path: str, cfg, *, rollout_batch_size: int):
        self.rank, self.world_size = world()
        per_rank = max(cfg.trainer.mini_batches, math.ceil(rollout_batch_size / self.world_size))
        super().__init__(model_path, cfg, rollout_batch_size=per_rank)

    # -------------------------------------------------------------- helpers
    def _idle_forward(self, batch):
        """A pass over one row with no weight in the loss: keeps ZeRO's per-pass collectives in step
        on a rank that has no rows left."""
        logp, _, _, _ = self._forward(self.engine, batch, torch.tensor([0]))
        return logp.sum() * 0.0

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def _group_rows(self, group_ids: torch.Tensor) -> list[torch.Tensor]:
        """Rows of each rank's groups (groups in order of first appearance, split contiguously)."""
        order = list(dict.fromkeys(group_ids.tolist()))
        out = []
        for r in range(self.world_size):
            mine = {order[i] for i in group_share(len(order), r, self.world_size)}
            out.append(torch.tensor([i for i, g in enumerate(group_ids.tolist()) if g in mine], dtype=torch.long))
        return out

    # -------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, batch, *, seed: int = 0):
        import torch.distributed as dist

        from resrl.algorithms import ResidualStats

        mbs = self.cfg.trainer.micro_batch_size
        shares = self._group_rows(batch.group_ids)
        counts = [len(list(group_chunks(batch.group_ids[rows], mbs))) if len(rows) else 0 for rows in shares]
        own = shares[self.rank]
        part = super().score(batch.select(own.tolist()), seed=seed) if len(own) else None
        if self.zero_stage == 3:  # as many passes as the busiest rank
            with evaluating(self.engine):
                for _ in range(max(counts) - counts[self.rank]):
                    self._idle_forward(batch)
        mine = None if part is None else {"rows": own, "logp": part.logp, "entropy": part.entropy,
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

    # -------------------------------------------------------------- the update
    def _optimizer_step(self, batch, rows, coef, scored, adv):
        """This rank's share of the mini-batch `rows`; the loss, norm and sums returned are the global ones."""
        mbs = self.cfg.trainer.micro_batch_size
        shares = list(torch.tensor_split(rows, self.world_size))
        n_micro = max(1, max(math.ceil(len(s) / mbs) for s in shares))
        mine = shares[self.rank]
        keys = list(_SUMMED) + (["kl_ref"] if scored.ref_logp is not None and self.cfg.loss.kl_coef else [])
        if self.cfg.loss.rollout_correction.mode != "none" and batch.sampler_logp is not None:
            keys += ["rollout_corr/weight_mean", "rollout_corr/changed_frac"]
        local = Counter(dict.fromkeys(keys, 0.0))
        total, norm = 0.0, float("nan")
        for k in range(n_micro):
            mrows = mine[k * mbs:(k + 1) * mbs]
            last = k == n_micro - 1
            if len(mrows):
                loss, part = self._micro_loss(batch, mrows, coef, scored, adv)
                local.update({key: float(value) for key, value in part.items()})
            else:
                loss = self._idle_forward(batch)
            self.engine.set_gradient_accumulation_boundary(last)
            # DeepSpeed averages over the ranks; the global loss is the sum of the ranks' losses
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if last:
                norm = self._grad_norm_before_step()
                self._refuse_gradient(norm)  # the global norm: every rank refuses alike
            self.engine.step()
            total += float(loss.detach())
        reduced = self._all_reduce([total, *(local[key] for key in keys)])
        return reduced[0], self._grad_norm_after(norm), Counter(dict(zip(keys, reduced[1:])))

    @torch.no_grad()
    def positive_logp(self, batch) -> torch.Tensor:
        """Each rank scores its share of the positives; the (B, T) tensor is summed over the ranks."""
        import torch.distributed as dist

        pos = batch.correct.nonzero().flatten()
        out = torch.zeros(batch.response_mask().shape)
        mbs = self.cfg.trainer.micro_batch_size
        shares = list(torch.tensor_split(pos, self.world_size))
        n_chunks = max(math.ceil(len(s) / mbs) for s in shares) if len(pos) else 0
        mine = shares[self.rank] if len(pos) else pos
        with evaluating(self.engine):
            for k in range(n_chunks):
                rows = mine[k * mbs:(k + 1) * mbs]
                if not len(rows):
                    if self.zero_stage == 3:
                        self._idle_forward(batch)
                    continue
                logp, _, _, _ = self._forward(self.engine, batch, rows)
                out[rows, :logp.shape[1]] = logp.float().cpu()
        dist.all_reduce(out)
        return out

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        """Every rank takes part (gathering ZeRO-3 weights and writing ZeRO's shards are collective);
        rank 0 writes what is replicated (several machines need a shared file system for the run folder)."""
        import torch.distributed as dist

        from resrl import checkpoint

        checkpoint.save(ckpt_dir, step, self.engine, dict(self.named_weights()), self.tokenizer,
                        leader=self.rank == 0)
        dist.barrier()
