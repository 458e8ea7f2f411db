"""Who this process is among a run's data-parallel ranks, how the ranks are launched, and
rank 0's command channel.

The ranks are processes of one torch.distributed world (gloo on the CPU, nccl on CUDA),
started by torchrun (`resrl train trainer.num_processes=N` starts it on one machine; for
several machines, run torchrun on each, see README). Rank 0 runs the Prefect flow, data
preparation, evaluation, MLflow logging and the commits of `state.json`; the other ranks are
followers (`resrl.session.follow`): they wait for rank 0's commands (open / rollout / update /
save_checkpoint / close) and run the same `TrainingSession` methods, so the collectives of both
sides meet. The data-parallel update itself is `resrl.data_parallel.DataParallelTrainer`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta

from resrl import cores
from resrl.environment import free_port, set_engine_defaults
from resrl.errors import UserError


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


def check_launch(trainer_cfg) -> None:
    """The launcher's world must be the one the `trainer` section asks for."""
    rank, size = world()
    n = trainer_cfg.num_processes
    if "RANK" in os.environ and size != n:
        raise LaunchError(f"trainer.num_processes={n} but the launcher started {size} process(es) "
                          f"(WORLD_SIZE={size}); give torchrun --nnodes x --nproc_per_node = {n}.")
    if n > 1 and "RANK" not in os.environ:
        raise LaunchError(f"trainer.num_processes={n} needs a launcher (torchrun) to start the ranks; "
                          "`resrl train` starts it on one machine, see README for several machines.")


def launcher_command(trainer_cfg, argv: list[str]) -> list[str]:
    """torchrun on this machine for `trainer.num_processes` ranks, running `resrl <argv>` in each."""
    if importlib.util.find_spec("torch.distributed.run") is None:
        raise LaunchError("trainer.num_processes > 1 needs torchrun (torch.distributed.run), "
                          "which this torch does not have.")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(trainer_cfg.num_processes), "--master_addr", "127.0.0.1",
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


def receive() -> tuple[str, dict]:
    """On a follower: rank 0's next command and its arguments."""
    return _CHANNEL.recv()
