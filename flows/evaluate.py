"""Scheduled evaluation: the newest checkpoint of a named run, evaluated with a fresh
vLLM engine and logged into that same MLflow run (as `eval_scheduled/...` at the
checkpoint's step), so a long or finished run can be re-checked on a cron schedule.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from prefect import flow, get_run_logger

from resrl.checkpoint import latest_checkpoint, policy_dir, step_of
from resrl.config import ConfigError, load_config
from tasks import tracking


def find_run(cfg, name: str):
    runs = tracking.search_runs(cfg, f"tags.`mlflow.runName` = '{name}'", order_by=["attributes.start_time DESC"])
    if not runs:
        raise ConfigError(f"no MLflow run named '{name}' in {tracking.tracking_uri(cfg)} "
                          f"(experiment '{cfg.run.experiment}')")
    return runs[0]


@flow(name="resrl-evaluate")
def evaluate_run_flow(run_name: str, config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """Evaluate the newest policy of the run `run_name` (config_file/overrides locate the MLflow store)."""
    from resrl.evaluation import evaluate
    from resrl.prepare import prepare_base_and_data
    from resrl.data import load_prepared
    from resrl.rewards import load_reward_function
    from resrl.rollout import RolloutEngine

    logger = get_run_logger()
    store_cfg = load_config(config_file, overrides or [])
    run = find_run(store_cfg, run_name)
    rdir = Path(run.data.tags["resrl.run_dir"])
    client = tracking.client_for(store_cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the run's own resolved config, as logged
        cfg = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", tmp))
    ckpt = latest_checkpoint(rdir)
    if ckpt is None:
        raise ConfigError(f"run '{run_name}' ({rdir}) has no checkpoint yet")
    step = step_of(ckpt)
    test = load_prepared(prepare_base_and_data(cfg)["dataset_dir"])["test"]
    engine = RolloutEngine.for_run(str(policy_dir(ckpt)), cfg, max(len(p) for p in test["prompt_token_ids"]))
    try:
        metrics, samples = evaluate(engine, test, cfg.eval, load_reward_function(cfg.reward.function), cfg.seed, step,
                                    max_error_fraction=OmegaConf.select(cfg, "reward.max_error_fraction", default=1.0))
    finally:
        engine.close()
    scheduled = {k.replace("eval/", "eval_scheduled/", 1): v for k, v in metrics.items() if k.startswith("eval/")}
    tracking.log_metrics(store_cfg, run.info.run_id, scheduled, step)
    client.log_text(run.info.run_id, json.dumps(samples, indent=1), f"eval_scheduled/step_{step:05d}/samples.json")
    logger.info("run %s, step %d: %s", run_name, step,
                ", ".join(f"{k} {v:.3f}" for k, v in scheduled.items() if "pass_at" in k or "avg_at" in k))
    return {"run_id": run.info.run_id, "step": step, "metrics": scheduled}
