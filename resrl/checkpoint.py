"""A run's checkpoints: where they live and what one holds. The one owner of that layout.

    <run_dir>/checkpoints/step_00012/
        policy/                  the policy as a Hugging Face folder (safetensors) + tokenizer
        optimizer.safetensors    a plain torch optimizer's state (param groups in the metadata)
        deepspeed/               ... or a ZeRO optimizer's partitioned state, in DeepSpeed's format
        trainer_state.json       {"step": 12}
        step_metrics.json        the metrics of the steps it commits, until they are in MLflow
        manifest.json            written last, at the commit: every file's size and sha256, the step,
                                 the MLflow run id and the config hash (see `verify`, `resume_checkpoint`)

Everything else (the trainer, the tasks, the flows, the benchmarks) asks this module for
these paths instead of spelling them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from resrl.cache import file_sha256
from resrl.errors import UserError

POLICY = "policy"
OPTIMIZER = "optimizer.safetensors"
DEEPSPEED = "deepspeed"
TRAINER_STATE = "trainer_state.json"
STEP_METRICS = "step_metrics.json"
MANIFEST = "manifest.json"
_PREFIX = "step_"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside on resume (kept for inspection, never loaded)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:05d}"


def policy_dir(ckpt_dir: Path) -> Path:
    """The checkpoint's policy: a folder `AutoModelForCausalLM.from_pretrained` and vLLM load."""
    return Path(ckpt_dir) / POLICY


def step_of(ckpt_dir: Path) -> int:
    return int(Path(ckpt_dir).name.removeprefix(_PREFIX))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders on disk, oldest step first."""
    return sorted((Path(run_dir) / "checkpoints").glob(f"{_PREFIX}*"), key=step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int, committed: int) -> None:
    """Keep the `keep` newest checkpoints up to the committed step. Any newer one was
    written by an interrupted run before its step was committed, so it is stale."""
    for ckpt in list_checkpoints(run_dir):
        if step_of(ckpt) > committed:
            shutil.rmtree(ckpt, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_step_metrics(ckpt_dir: Path, entries: list[tuple[int, dict]]) -> None:
    """The metrics of the steps this checkpoint commits (those since the previous one). The
    flow writes them before the commit and logs them to MLflow after it; a resume logs any
    that did not get there, so an interruption neither loses nor repeats a step's metrics."""
    (Path(ckpt_dir) / STEP_METRICS).write_text(json.dumps([[step, m] for step, m in entries]))


def load_step_metrics(ckpt_dir: Path) -> list[tuple[int, dict]]:
    path = Path(ckpt_dir) / STEP_METRICS
    return [(int(step), m) for step, m in json.loads(path.read_text())] if path.is_file() else []


# ----------------------------------------------------------------------------- integrity

class CheckpointDamaged(UserError):
    """No intact checkpoint to resume from."""


def write_manifest(ckpt_dir: Path, step: int, **info) -> None:
    """Every file of the checkpoint with its size and sha256, plus `step` and `info` (the MLflow run
    id, the config hash): written at the commit, after everything else, atomically. A resume
    verifies it (`verify`); a run folder that lost its state.json is recovered from it."""
    ckpt_dir = Path(ckpt_dir)
    files = {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, **info, "files": files}, indent=1))
    os.replace(tmp, ckpt_dir / MANIFEST)


def read_manifest(ckpt_dir: Path) -> dict | None:
    """The checkpoint's manifest; None when it has none (written before manifests existed, or the
    commit never happened)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("no file list")
        return data
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None


def verify(ckpt_dir: Path) -> str | None:
    """None when the checkpoint is intact (every file of its manifest there, with its size and
    digest); else one phrase naming the damaged file. A checkpoint without a manifest is
    accepted unverified (resrl before manifests)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointDamaged as exc:
        return str(exc)
    if manifest is None:
        return None if (ckpt_dir / TRAINER_STATE).is_file() else f"{ckpt_dir / TRAINER_STATE} is missing"
    for rel, want in manifest["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, its manifest says {want['size']}"
        if file_sha256(path) != want["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


def resume_checkpoint(run_dir: Path, committed: int) -> tuple[Path, list[str]]:
    """The newest intact checkpoint at or before the committed step, and one warning line per
    newer one that is damaged (set aside as `damaged-step_N`, so it is never loaded or pruned
    into place). CheckpointDamaged when none is intact."""
    damaged = []
    for ckpt in reversed([c for c in list_checkpoints(run_dir) if step_of(c) <= committed]):
        problem = verify(ckpt)
        if problem is None:
            warnings = [f"checkpoint {c.name} is damaged ({why}); resuming from {ckpt.name} (step {step_of(ckpt)}), "
                        f"the damaged one is kept as {c.parent / (DAMAGED_PREFIX + c.name)}" for c, why in damaged]
            for c, _ in damaged:
                aside = c.parent / (DAMAGED_PREFIX + c.name)
                shutil.rmtree(aside, ignore_errors=True)  # one set aside by an earlier resume
                os.replace(c, aside)
            return ckpt, warnings
        damaged.append((ckpt, problem))
    found = "; ".join(f"{c.name}: {why}" for c, why in damaged) or "none on disk"
    raise CheckpointDamaged(f"run folder {run_dir} is committed at step {committed} but has no intact checkpoint to "
                            f"resume from ({found}); restore the checkpoints from a copy, or delete the run folder "
                            "(or set run.name) to train it again from the start")


# ----------------------------------------------------------------------------- contents

def save_policy(out_dir: Path, module, weights: dict[str, torch.Tensor], tokenizer) -> Path:
    """An HF model folder (safetensors) with the given (gathered) weights, and the tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save(ckpt_dir: Path, step: int, engine, weights: dict[str, torch.Tensor], tokenizer, *,
         leader: bool = True) -> None:
    """Policy + optimizer state + step, from a DeepSpeed engine. With data-parallel ranks every
    rank calls this: ZeRO's partitioned optimizer state is written by each rank, what is
    replicated (the policy, a plain optimizer's state, the step) only by the leader, rank 0."""
    ckpt_dir = Path(ckpt_dir)
    if leader:
        save_policy(policy_dir(ckpt_dir), engine.module, weights, tokenizer)
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        if leader:
            from safetensors.torch import save_file

            state = opt.state_dict()
            tensors = {f"{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
                       for i, s in state["state"].items() for k, v in s.items()}
            save_file(tensors, str(ckpt_dir / OPTIMIZER),
                      metadata={"param_groups": json.dumps(state["param_groups"])})
    else:
        # ZeRO optimizers keep partitioned state: DeepSpeed's own format, written by this run.
        engine.save_checkpoint(str(ckpt_dir / DEEPSPEED), tag="latest", save_latest=False)
    if leader:
        (ckpt_dir / TRAINER_STATE).write_text(json.dumps({"step": step}))


def load(ckpt_dir: Path, engine) -> int:
    """Restore the optimizer state into a DeepSpeed engine built on the checkpoint's policy;
    returns the RL step saved. The LR schedule is not restored (the trainer re-advances it)."""
    ckpt_dir = Path(ckpt_dir)
    step = json.loads((ckpt_dir / TRAINER_STATE).read_text())["step"]
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(ckpt_dir / OPTIMIZER))
        with safe_open(str(ckpt_dir / OPTIMIZER), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": groups})
    else:
        engine.load_checkpoint(str(ckpt_dir / DEEPSPEED), tag="latest", load_module_strict=True,
                               load_lr_scheduler_states=False)
    return step
