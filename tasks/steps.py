"""The workflow steps as Prefect tasks (and the scheduled evaluation of a saved checkpoint).

Tasks take and return plain data (the resolved config as a dict, paths, step
numbers, metrics), never live engines: the vLLM engine and the DeepSpeed trainer
live in the run's `TrainingSession`, looked up by run folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from resrl.config import from_dict, run_dir
from resrl.errors import reports_unwritable
from resrl.metrics import pass_table
from resrl.checkpoint import checkpoint_dir, policy_dir
from resrl.run_state import RunState, eval_dir, rollout_path
from resrl.schedule import checkpoint_due


def _session(config: dict, prepared: dict) -> tuple[object, dict[str, float]]:
    """The run's live session, started on first use (from the last checkpoint when resuming).

    Returns it with {"time/engine_start_s": seconds} when this call started the engines.
    """
    from resrl.session import get_session, open_session

    cfg = from_dict(config)
    rdir = run_dir(cfg)
    session = get_session(str(rdir))
    if session is not None:
        return session, {}
    t0 = time.time()
    state = RunState.load(rdir)
    if state is not None and state.step > 0:
        ckpt = checkpoint_dir(rdir, state.step)
        session = open_session(str(rdir), cfg, prepared, str(policy_dir(ckpt)), str(ckpt))
    else:
        session = open_session(str(rdir), cfg, prepared, prepared["policy_dir"], None)
    return session, {"time/engine_start_s": time.time() - t0}


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect's retry condition for the idempotent tasks: an error a retry cannot fix (a
    UserError: bad data, a missing model, a bad config) fails at once. Interrupts (Ctrl-C,
    SIGTERM) are never retried by Prefect."""
    from resrl.errors import UserError

    return not isinstance(state.data, UserError)


# Retries only where running a task again is safe and could succeed (README, "Retries"):
#   prepare-data         idempotent: content-addressed cache entries, built under a lock, renamed when whole;
#                        a transient error (disk, a hub download with HF_HUB_OFFLINE=0) can pass
#   evaluate-checkpoint  idempotent: reads a saved checkpoint with a fresh engine, returns metrics
#   rollout, update, evaluate: not retried. They run on the run's live engines; an update that fails
#   midway has changed the weights or the optimizer in memory, so running it again is not the same
#   step. A failed run is resumed from its last checkpoint by running it again instead.
@task(name="prepare-data", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)
@reports_unwritable  # a folder that cannot be written: one line naming it, not a traceback
def prepare_data(config: dict) -> dict:
    """Dataset and starting policy (built once per config, then reused from the cache)."""
    from resrl.prepare import prepare

    cfg = from_dict(config)
    return prepare(cfg, progress=cfg.run.progress)


@task(name="rollout", cache_policy=NO_CACHE)
@reports_unwritable  # a folder that cannot be written: one line naming it, not a traceback
def generate_rollouts(config: dict, prepared: dict, step: int) -> dict:
    """n samples per prompt from the current policy, scored; saved as safetensors."""
    session, started = _session(config, prepared)
    batch, metrics = session.rollout(step)
    path = batch.save(rollout_path(run_dir(from_dict(config)), step))
    return {"path": str(path), "metrics": {**metrics, **started}}


@task(name="update", cache_policy=NO_CACHE)
@reports_unwritable  # a folder that cannot be written: one line naming it, not a traceback
def update_policy(config: dict, prepared: dict, rollouts: str, step: int) -> dict:
    """One RL update on the saved rollouts, weight sync into vLLM, checkpoint when due.

    The checkpoint is written here but not committed to `state.json`: the flow adds the
    step's metrics to it, commits it, then logs them (see flows/train.py `_rl_step`)."""
    from resrl.batch import RolloutBatch

    cfg = from_dict(config)
    session, _ = _session(config, prepared)
    metrics = session.update(step, RolloutBatch.load(Path(rollouts)))
    saved = None
    if checkpoint_due(step, cfg):
        rdir = run_dir(cfg)
        saved = checkpoint_dir(rdir, step)
        session.save_checkpoint(saved, step)
    return {"metrics": metrics, "checkpoint": str(saved) if saved else None}


@task(name="evaluate", cache_policy=NO_CACHE)
@reports_unwritable  # a folder that cannot be written: one line naming it, not a traceback
def evaluate_policy(config: dict, prepared: dict, step: int, final: bool = False) -> dict:
    """Avg@k / Pass@k on held-out prompts; sample table and Pass@k plot written to the run folder."""
    from resrl.plots import plot_pass_at_k

    cfg = from_dict(config)
    session, started = _session(config, prepared)
    metrics, samples = session.evaluate(step, final=final)
    metrics.update(started)
    out = eval_dir(run_dir(cfg), step)
    out.mkdir(parents=True, exist_ok=True)
    samples_file, plot_file = out / "samples.json", out / "pass_at_k.png"
    samples_file.write_text(json.dumps(samples, indent=1))
    table = pass_table(metrics)
    plot_pass_at_k({f"step {step}": table}, plot_file, title=f"Pass@k, step {step}")
    return {"metrics": metrics, "dir": str(out), "samples_file": str(samples_file), "plot_file": str(plot_file)}


@task(name="evaluate-checkpoint", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_user_error)
@reports_unwritable  # a folder that cannot be written: one line naming it, not a traceback
def evaluate_checkpoint(config: dict, ckpt_dir: str) -> dict:
    """Avg@k / Pass@k of a saved checkpoint's policy on the held-out prompts, with a fresh vLLM
    engine (the scheduled evaluation of a run that may have finished long ago)."""
    from omegaconf import OmegaConf

    from resrl.checkpoint import step_of
    from resrl.data import load_prepared
    from resrl.evaluation import evaluate
    from resrl.prepare import prepare_base_and_data
    from resrl.rewards import load_reward_function
    from resrl.rollout import make_rollout_engine

    cfg = from_dict(config)
    step = step_of(Path(ckpt_dir))
    test = load_prepared(prepare_base_and_data(cfg)["dataset_dir"])["test"]
    engine = make_rollout_engine(str(policy_dir(Path(ckpt_dir))), cfg, max(len(p) for p in test["prompt_token_ids"]))
    try:
        metrics, samples = evaluate(engine, test, cfg.eval, load_reward_function(cfg.reward.function), cfg.seed, step,
                                    max_error_fraction=OmegaConf.select(cfg, "reward.max_error_fraction", default=1.0))
    finally:
        engine.close()
    return {"step": step, "metrics": metrics, "samples": samples}
