"""A run folder's progress record (`state.json`), its lock and where its files go.

    <run_dir>/state.json                 step, MLflow run id, evaluated steps, finished
    <run_dir>/run.lock                   held (flock) by the process training the run; names it
    <run_dir>/config.yaml                the resolved config
    <run_dir>/checkpoints/               see resrl/checkpoint.py (the one owner of that layout)
    <run_dir>/rollouts/step_00012.safetensors
    <run_dir>/eval/step_00012/           samples.json, pass_at_k.png
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resrl.errors import ConfigError, UserError


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
        """The folder's state; None when it has no state.json. A file that cannot be read is a
        UserError naming it and the way out, never a traceback."""
        p = cls.path(run_dir)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            fields = set(cls.__dataclass_fields__)
            if "config_hash" not in data or set(data) - fields:
                raise ValueError(f"fields {sorted(data)}, expected config_hash and some of {sorted(fields)}")
            state = cls(**data)
            if not (isinstance(state.step, int) and isinstance(state.finished, bool)
                    and isinstance(state.evaluated, list)):
                raise ValueError("step, finished or evaluated has the wrong type")
            return state
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise UserError(f"run state file {p} cannot be read ({detail}); delete it and run the same command "
                            "again: the run is recovered from its newest intact checkpoint and its MLflow "
                            "run") from None

    @classmethod
    def open(cls, run_dir: Path, config_hash: str, resume: bool) -> "RunState":
        """The folder's state, or a new one; refuses a folder that holds another config's run,
        or (resume=False) one that already got somewhere."""
        state = cls.load(run_dir)
        if state is None:
            state = cls(config_hash=config_hash)
            state.save(run_dir)
            return state
        if state.config_hash != config_hash:
            raise ConfigError(f"run folder {run_dir} holds a run with a different config (hash {state.config_hash}, "
                              f"now {config_hash}); set run.name to a new name, or leave it unset to get one per "
                              "config.")
        if not resume and (state.step > 0 or state.finished):
            raise ConfigError(f"run folder {run_dir} already holds a run at step {state.step}; run.resume=false "
                              "refuses to overwrite it. Delete the folder or pick another run.name.")
        return state

    @staticmethod
    def has_traces(run_dir: Path) -> bool:
        """Whether a run was started in the folder (its config, checkpoints, rollouts, evaluations):
        without state.json such a folder is recovered, never trained again from step 0 as a new run."""
        return (Path(run_dir) / "config.yaml").is_file() or any(
            any((Path(run_dir) / sub).glob("*")) for sub in ("checkpoints", "rollouts", "eval"))

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
        try:
            os.ftruncate(fd, 0)  # the holder's name is only for messages: a folder gone read-only must not
        except OSError:          # replace the run's own error with this one
            pass
        os.close(fd)  # closing releases the flock


def rollout_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "rollouts" / f"step_{step:05d}.safetensors"


def eval_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step_{step:05d}"
