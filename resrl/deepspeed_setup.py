"""DeepSpeed's side of the trainer: a process group for this process, the engine's config
dict and the learning-rate warm-up. The update itself is in trainer.py."""
from __future__ import annotations

import logging
import math

import torch

from resrl.environment import set_single_process_world

log = logging.getLogger(__name__)


def init_distributed(device: str) -> None:
    """A world of one process (gloo on the CPU, nccl on CUDA), unless launched by a launcher."""
    set_single_process_world(device)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _without_shm_comm_op()  # before anything makes DeepSpeed's comm backend (deepspeed.initialize does too)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    # Closing a vLLM engine destroys the default process group; DeepSpeed keeps its clone of
    # the old world group and fails on the next engine in this process ("Group ... is not
    # registered"). Drop the stale clone so DeepSpeed clones the current world again.
    from deepspeed.utils import groups

    world = groups._WORLD_GROUP
    if world is not None and world not in torch.distributed.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def _without_shm_comm_op() -> None:
    """DeepSpeed's comm backend builds (gcc, ~40 s the first time: ../shared/STACK.md) and loads a
    shared-memory op on the CPU at init. Only `inference_all_reduce` (tensor-parallel inference)
    uses it; training's collectives go through torch.distributed (gloo). So it is not built."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the attribute deepspeed.comm.torch is torch itself)
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def zero_stage(configured: int, dtype: torch.dtype) -> int:
    """`trainer.zero_stage`, but at least 1 under bf16/fp16: those keep fp32 master weights in the
    optimizer, which ZeRO (stage >= 1) saves and restores with its checkpoints and DeepSpeed's
    stage-0 BF16 optimizer does not."""
    if dtype == torch.float32 or configured >= 1:
        return configured
    log.info("mixed precision: using ZeRO stage 1 instead of 0 (fp32 master weights in checkpoints)")
    return 1


def deepspeed_config(trainer_cfg, dtype: torch.dtype, rollout_batch_size: int) -> dict:
    """The engine's config: AdamW, `trainer.mini_batches` optimizer steps per rollout batch, each
    mini-batch in micro-batches of at most `trainer.micro_batch_size` sequences."""
    t = trainer_cfg
    mini = rollout_batch_size // t.mini_batches
    config = {
        "train_micro_batch_size_per_gpu": min(t.micro_batch_size, mini),
        "gradient_accumulation_steps": max(1, math.ceil(mini / t.micro_batch_size)),
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage(t.zero_stage, dtype)},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }
    if dtype != torch.float32:  # accumulate micro-batch gradients in fp32, not in the model dtype
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def warmup_schedule(warmup_opt_steps: int):
    """The LR scheduler factory for `deepspeed.initialize`: linear warm-up, then constant."""
    warmup = max(1, warmup_opt_steps)
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
