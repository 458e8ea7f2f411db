"""Which device and dtype a run uses: one rule for the trainer and the rollout engine."""
from __future__ import annotations

import torch

from resrl.errors import ConfigError


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str) -> str:
    """`trainer.device`: auto -> cuda when visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    return name


def check_dtype(name: str, device: str) -> None:
    """A dtype the device can train in."""
    if name == "float16" and device == "cpu":
        raise ConfigError("model.dtype=float16 cannot train on the CPU (DeepSpeed's CPU accelerator has no "
                          "fp16 loss scaling); use float32 or bfloat16.")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`model.dtype`: auto -> bfloat16 on CUDA, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)
