"""The training flow: data preparation once, then rollout -> update per RL step,
evaluation every `eval.every` steps and at the end; everything logged to one MLflow run.

Re-running the same config continues from the run folder's last checkpoint.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

from omegaconf import OmegaConf
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from resrl.config import ConfigError, config_hash, from_dict, load_config, run_dir, run_name, to_dict, validate
from resrl.run_state import RunState, checkpoint_dir, prune_checkpoints, run_lock
from tasks import tracking
from tasks.steps import evaluate_policy, generate_rollouts, prepare_data, update_policy


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def _open_state(cfg, rdir: Path) -> RunState:
    h = config_hash(cfg)
    state = RunState.load(rdir)
    if state is None:
        state = RunState(config_hash=h)
        state.save(rdir)
        return state
    if state.config_hash != h:
        raise ConfigError(f"run folder {rdir} holds a run with a different config (hash {state.config_hash}, "
                          f"now {h}); set run.name to a new name, or leave it unset to get one per config.")
    if not cfg.run.resume and (state.step > 0 or state.finished):
        raise ConfigError(f"run folder {rdir} already holds a run at step {state.step}; run.resume=false "
                          "refuses to overwrite it. Delete the folder or pick another run.name.")
    return state


def _log_eval(cfg, run_id: str, result: dict, step: int) -> None:
    import json

    import pandas as pd

    tracking.log_metrics(cfg, run_id, result["metrics"], step)
    out = Path(result["dir"])
    client = tracking.client_for(cfg)
    samples = json.loads((out / "samples.json").read_text())
    if samples:
        client.log_table(run_id, data=pd.DataFrame(samples), artifact_file=f"eval/{out.name}/samples.json")
    client.log_artifact(run_id, str(out / "pass_at_k.png"), artifact_path=f"eval/{out.name}")


@flow(name="resrl-train")
def train_flow(config: dict | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train one policy and evaluate it.

    Give either `config` (a resolved config dict, as the CLI does) or `config_file`
    and/or `overrides` (key=value strings), which are loaded and checked here - the
    form deployments use.
    """
    t_flow = time.time()
    logger = get_run_logger()
    if config is None:
        config = to_dict(load_config(config_file, overrides or []))
    cfg = from_dict(config)
    validate(cfg)
    rdir = run_dir(cfg)
    with run_lock(rdir):  # one owner per run folder: a second start of the same run refuses, naming the holder
        return _run(cfg, config, rdir, logger, t_flow)


def _run(cfg, config: dict, rdir: Path, logger, t_flow: float) -> dict:
    """The flow's body, while this process holds the run folder."""
    state = _open_state(cfg, rdir)
    (rdir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    uri = tracking.tracking_uri(cfg)
    if state.finished:
        logger.info("Run %s already finished; nothing to do (MLflow run %s).", rdir, state.mlflow_run_id)
        return {"run_dir": str(rdir), "mlflow_run_id": state.mlflow_run_id, "tracking_uri": uri,
                "already_finished": True}

    # The MLflow run comes first, so a run that fails in data preparation (a bad dataset, a
    # missing model) is still there in the UI, FAILED, with its config and the error.
    fr_id = str(flow_run.id) if flow_run.id else "none"
    client = tracking.client_for(cfg)
    if state.mlflow_run_id is None:
        tags = {"prefect.flow_run_id": fr_id, "resrl.config_hash": state.config_hash,
                "resrl.run_dir": str(rdir.resolve()), "resrl.algorithm": cfg.algorithm.name}
        if cfg.run.sweep_id:
            tags["resrl.sweep_id"] = cfg.run.sweep_id
        state.mlflow_run_id = tracking.start_run(cfg, run_name(cfg), tags=tags, parent_run_id=cfg.run.parent_run_id)
        state.save(rdir)
        tracking.log_config_params(cfg, state.mlflow_run_id)
        client.log_text(state.mlflow_run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    else:
        logger.info("Resuming %s from step %d (MLflow run %s).", rdir, state.step, state.mlflow_run_id)
        client.set_terminated(state.mlflow_run_id, status="RUNNING")
        client.set_tag(state.mlflow_run_id, "prefect.flow_run_id", fr_id)
        if "resrl.error" in client.get_run(state.mlflow_run_id).data.tags:  # from the attempt that failed
            client.delete_tag(state.mlflow_run_id, "resrl.error")
    run_id = state.mlflow_run_id
    tracking.announce_run(cfg, run_id)
    try:
        result = _train(cfg, config, rdir, state, run_id, client, logger)
        total = time.time() - t_flow
        timings = result["timings"]
        timings["orchestration"] = total - sum(timings.values())
        summary_metrics = {f"time/total_{k}_s": v for k, v in timings.items()}
        summary_metrics["time/flow_s"] = total
        summary_metrics["sys/peak_rss_gb"] = _peak_rss_gb()
        tracking.log_metrics(cfg, run_id, summary_metrics, cfg.trainer.steps)
        client.set_terminated(run_id, status="FINISHED")
        state.finished = True
        state.save(rdir)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"  # stopped by the user, not broken
        client.set_tag(run_id, "resrl.error", f"{type(exc).__name__}: {exc}"[:4000])
        client.set_terminated(run_id, status=status)
        # said here, where it happens (not by the caller, which cannot tell whether the run got this far)
        logger.error("MLflow run %s is marked %s (tag resrl.error); running the same config again continues "
                     "in that run. See: %s", run_id, status, tracking.run_url_hint(cfg))
        raise
    finally:
        from resrl.session import close_session

        close_session(str(rdir))  # free the engines; a later call starts from the checkpoint
    return {"run_dir": str(rdir), "mlflow_run_id": run_id, "tracking_uri": uri, "final_eval": result["final_eval"],
            "timings": timings, "peak_rss_gb": summary_metrics["sys/peak_rss_gb"], "already_finished": False}


def _train(cfg, config: dict, rdir: Path, state: RunState, run_id: str, client, logger) -> dict:
    """Data preparation, then rollout -> update per step with evaluations; returns timings and the last eval."""
    timings = {"prepare": 0.0, "engine_start": 0.0, "rollout": 0.0, "update": 0.0, "eval": 0.0}
    prepared = prepare_data(config)
    timings["prepare"] = prepared["seconds"]
    for line in prepared["summary_lines"]:
        logger.info("data: %s", line)
    logger.info("policy: %s (warm-start %s)", prepared["policy_dir"],
                {None: "off", True: "reused from cache", False: "trained now"}[prepared["warmstart_reused"]])
    if not state.data_logged and state.step == 0 and not state.evaluated:  # once per run, also across resumes
        tracking.log_metrics(cfg, run_id, prepared["metrics"], 0)
        state.data_logged = True
        state.save(rdir)

    def evaluate(step: int) -> dict:
        result = evaluate_policy(config, prepared, step, final=step == cfg.trainer.steps)
        _log_eval(cfg, run_id, result, step)
        timings["eval"] += result["metrics"]["time/eval_s"]
        timings["engine_start"] += result["metrics"].get("time/engine_start_s", 0.0)
        state.evaluated = sorted(set(state.evaluated) | {step})
        state.save(rdir)
        m = result["metrics"]
        k = int(m["eval/k"])
        errors = int(m["eval/reward_errors"])
        logger.info("eval step %d: avg@%d %.3f | pass@%d %.3f | pass@1 %.3f%s", step, k,
                    m[f"eval/avg_at_{k}"], k, m[f"eval/pass_at_{k}"], m["eval/pass_at_1"],
                    f" | reward errors {errors}" if errors else "")
        return m

    steps = cfg.trainer.steps
    last_eval: dict = {}
    due = state.step == 0 or state.step % cfg.eval.every == 0 or state.step == steps
    if due and state.step not in state.evaluated:  # step 0, or an evaluation an interruption skipped
        last_eval = evaluate(state.step)
    resumed_from = state.step
    for step in range(state.step + 1, steps + 1):
        roll = generate_rollouts(config, prepared, step)
        upd = update_policy(config, prepared, roll["path"], step)
        metrics = {**roll["metrics"], **upd["metrics"]}
        timings["rollout"] += metrics["time/rollout_s"]
        timings["engine_start"] += metrics.get("time/engine_start_s", 0.0)
        timings["update"] += metrics["time/update_s"] + metrics["time/weight_sync_s"]
        if step == resumed_from + 1:  # an earlier attempt may have logged it, then died before the commit
            tracking.log_metrics(cfg, run_id, tracking.not_yet_logged(cfg, run_id, metrics, step), step)
        else:
            tracking.log_metrics(cfg, run_id, metrics, step)
        errors = int(metrics["train/reward_errors"])  # failed reward calls, scored 0 (see reward.max_error_fraction)
        logger.info("step %d/%d | reward %.3f | pass %.3f | len %.1f | loss %.4f | gnorm %.3f | "
                    "w_neg %.3f | lld %.4f | sampler dlogp %.1e | %.1fs rollout %.1fs update%s", step, steps,
                    metrics["train/reward_mean"], metrics["train/pass_rate"], metrics["train/response_length"],
                    metrics["train/loss"], metrics["train/grad_norm"], metrics.get("train/resrl/weight_mean",
                                                                                   float("nan")),
                    metrics["train/lld"], metrics.get("train/sampler_logp_diff_max", float("nan")),
                    metrics["time/rollout_s"], metrics["time/update_s"],
                    f" | reward errors {errors}" if errors else "")
        if upd["checkpoint"]:  # commit only after the metrics are logged (see update_policy)
            state.step = step
            state.save(rdir)
            prune_checkpoints(rdir, cfg.run.keep_checkpoints, committed=step)
        if step % cfg.eval.every == 0 or step == steps:
            last_eval = evaluate(step)
    final_policy = checkpoint_dir(rdir, steps) / "policy" if steps > 0 else Path(prepared["policy_dir"])
    client.log_artifacts(run_id, str(final_policy), artifact_path="policy")
    return {"timings": timings, "final_eval": last_eval}
