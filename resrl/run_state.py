"""A run folder's progress record (`state.json`) and checkpoint layout.

    <run_dir>/state.json                 step, MLflow run id, evaluated steps, finished
    <run_dir>/checkpoints/step_00012/    policy/ (HF, safetensors), optimizer, trainer_state.json
    <run_dir>/rollouts/step_00012.safetensors
    <run_dir>/eval/step_00012/           samples.json, pass_at_k.png
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunState:
    config_hash: str
    step: int = 0                       # last RL step whose checkpoint is on disk
    mlflow_run_id: str | None = None
    evaluated: list[int] = field(default_factory=list)
    finished: bool = False

    @staticmethod
    def path(run_dir: Path) -> Path:
        return Path(run_dir) / "state.json"

    @classmethod
    def load(cls, run_dir: Path) -> "RunState | None":
        p = cls.path(run_dir)
        return cls(**json.loads(p.read_text())) if p.is_file() else None

    def save(self, run_dir: Path) -> None:
        p = self.path(run_dir)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, p)  # atomic: an interruption never leaves half a state file


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:05d}"


def prune_checkpoints(run_dir: Path, keep: int, committed: int) -> None:
    """Keep the `keep` newest checkpoints up to the committed step. Any newer one was
    written by an interrupted run before its step was committed, so it is stale."""
    for ckpt in (Path(run_dir) / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > committed:
            shutil.rmtree(ckpt, ignore_errors=True)
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def rollout_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "rollouts" / f"step_{step:05d}.safetensors"


def eval_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step_{step:05d}"
