"""A run folder's progress record (`state.json`) and checkpoint layout.

    <run_dir>/state.json                 step, MLflow run id, evaluated steps, finished
    <run_dir>/run.lock                   held (flock) by the process training the run; names it
    <run_dir>/checkpoints/step_00012/    policy/ (HF, safetensors), optimizer, trainer_state.json
    <run_dir>/rollouts/step_00012.safetensors
    <run_dir>/eval/step_00012/           samples.json, pass_at_k.png
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resrl.errors import UserError


class RunFolderBusy(UserError):
    """Another process is training this run folder."""


@dataclass
class RunState:
    config_hash: str
    step: int = 0                       # last RL step whose checkpoint is on disk
    mlflow_run_id: str | None = None
    evaluated: list[int] = field(default_factory=list)
    finished: bool = False
    data_logged: bool = False           # the data/* metrics are in MLflow (logged once, at step 0)

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


@contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for this process: one owner at a time.

    An flock, not a pid file: the OS drops it when the holder dies (even by kill -9), so
    a stale lock never blocks a resume. The holder's pid and host are written inside,
    only for the message a second start gets."""
    path = Path(run_dir) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderBusy(f"run folder {run_dir} is in use by {holder}; wait for it to end or stop it "
                            "(then the same command resumes), or set run.name for a separate run") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
                  .encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


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
