"""Scheduled evaluation: the newest committed checkpoint of a named run, evaluated with a fresh
vLLM engine and logged into that same MLflow run (as `eval_scheduled/...` at the
checkpoint's step), so a long or finished run can be re-checked on a cron schedule.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from resrl.checkpoint import list_checkpoints, step_of, verify
from resrl.config import load_config, to_dict
from resrl.errors import ConfigError
from resrl.run_state import RunState
from tasks import tracking
from tasks.steps import evaluate_checkpoint


@flow(name="resrl-evaluate")
def evaluate_run_flow(run_name: str, config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """Evaluate the newest policy of the run `run_name` (config_file/overrides locate the MLflow store)."""
    logger = get_run_logger()
    store_cfg = load_config(config_file, overrides or [])
    run = tracking.find_run_by_name(store_cfg.run, run_name)
    rdir = Path(run.data.tags["resrl.run_dir"])
    cfg = tracking.logged_config(store_cfg.run, run.info.run_id)  # the run's own resolved config
    state = RunState.load(rdir)
    committed = state.step if state is not None else 0  # a checkpoint past it is a step still being written
    ckpt = next((c for c in reversed(list_checkpoints(rdir)) if step_of(c) <= committed and verify(c) is None), None)
    if ckpt is None:
        raise ConfigError(f"run '{run_name}' ({rdir}) has no committed, intact checkpoint yet "
                          f"(state.json commits step {committed})")
    result = evaluate_checkpoint(to_dict(cfg), str(ckpt))
    step = result["step"]
    scheduled = {k.replace("eval/", "eval_scheduled/", 1): v for k, v in result["metrics"].items()
                 if k.startswith("eval/")}
    tracking.log_metrics(store_cfg.run, run.info.run_id, scheduled, step)
    tracking.log_json(store_cfg.run, run.info.run_id, result["samples"],
                      f"eval_scheduled/step_{step:05d}/samples.json")
    logger.info("run %s, step %d: %s", run_name, step,
                ", ".join(f"{k} {v:.3f}" for k, v in scheduled.items() if "pass_at" in k or "avg_at" in k))
    return {"run_id": run.info.run_id, "step": step, "metrics": scheduled}
