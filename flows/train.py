"""The training flow: data preparation once, then rollout -> update per RL step,
evaluation every `eval.every` steps and at the end; everything logged to one MLflow run.

Re-running the same config continues from the run folder's last checkpoint.
"""
from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from resrl import cores, interrupts
from resrl.checkpoint import (MANIFEST, checkpoint_dir, list_checkpoints, load_step_metrics, policy_dir,
                              prune_checkpoints, read_manifest, resume_checkpoint, save_step_metrics, step_of,
                              write_manifest)
from resrl.config import config_hash, from_dict, load_config, run_dir, to_dict, validate
from resrl.errors import ConfigError, UserError, writing
from resrl.metrics import EVAL_K, avg_key, pass_key
from resrl.run_state import RunState, run_lock
from resrl.schedule import eval_due, missed_eval
from tasks import tracking
from tasks.steps import evaluate_policy, generate_rollouts, prepare_data, update_policy

# resrl's own INFO lines (e.g. "waiting for another process building <cache entry>") reach the flow's
# log: Prefect hands them its handlers (PREFECT_LOGGING_EXTRA_LOGGERS=resrl) but not a level
logging.getLogger("resrl").setLevel(logging.INFO)


@dataclass
class _Run:
    """The run being trained, as the flow's steps below share it."""
    cfg: DictConfig
    config: dict           # the same, as the plain dict the tasks take
    rdir: Path
    state: RunState
    run_id: str            # its MLflow run
    logger: Any
    uncommitted: list[tuple[int, dict]] = field(default_factory=list)  # steps since the last checkpoint


@flow(name="resrl-train")
def train_flow(config: dict | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train one policy and evaluate it.

    Give either `config` (a resolved config dict, as the CLI does) or `config_file`
    and/or `overrides` (key=value strings), which are loaded and checked here - the
    form deployments use.
    """
    t_flow = time.time()
    _record_stop_signals()
    cores.apply_from_env()  # a share handed down (a sweep lane, a worker started with RESRL_WORKER_CORES)
    if config is None:
        config = to_dict(load_config(config_file, overrides or []))
    cfg = from_dict(config)
    validate(cfg)
    rdir = run_dir(cfg)
    tracking.check_writable_folders(cfg.run)  # an unwritable output, cache or artifact folder: one line, now
    with writing(), run_lock(rdir):  # one owner per run folder: a second start of the same run refuses
        return _run(cfg, config, rdir, t_flow)


def _record_stop_signals() -> None:
    """Inside a flow run Prefect's SIGTERM handler (raising TerminationSignal) has replaced resrl's;
    wrap it so a SIGTERM is recorded too, and a stop a destructor swallows is still found by
    `interrupts.check()`. Its module-level name is wrapped as well: Prefect compares the installed
    handler against it (and a nested flow run installs it again)."""
    from prefect.utilities import engine as prefect_engine

    interrupts.install_hook()
    if threading.current_thread() is not threading.main_thread():
        return
    original = getattr(prefect_engine, "_prefect_sigterm_handler", None)
    if original is not None:
        prefect_engine._prefect_sigterm_handler = interrupts.recording(original)
    current = signal.getsignal(signal.SIGTERM)
    if current is original and original is not None:
        signal.signal(signal.SIGTERM, prefect_engine._prefect_sigterm_handler)
    elif callable(current):
        signal.signal(signal.SIGTERM, interrupts.recording(current))


def _run(cfg, config: dict, rdir: Path, t_flow: float) -> dict:
    """The flow's body, while this process holds the run folder."""
    logger = get_run_logger()
    state = _open_state(cfg, rdir, logger)
    (rdir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    uri = tracking.tracking_uri(cfg.run)
    if state.finished:
        logger.info("Run %s already finished; nothing to do (MLflow run %s).", rdir, state.mlflow_run_id)
        return {"run_dir": str(rdir), "mlflow_run_id": state.mlflow_run_id, "tracking_uri": uri,
                "already_finished": True}

    # The MLflow run comes first, so a run that fails in data preparation (a bad dataset, a
    # missing model) is still there in the UI, FAILED, with its config and the error.
    if state.mlflow_run_id is not None:
        logger.info("Resuming %s from step %d (MLflow run %s).", rdir, state.step, state.mlflow_run_id)
    run_id = tracking.start_or_resume_run(cfg, state, rdir, flow_run_id=str(flow_run.id) if flow_run.id else "none")
    tracking.announce_run(cfg.run, run_id)
    monitor = tracking.start_system_metrics(cfg.run, run_id)  # system/* every 10 s (run.system_metrics)
    try:
        result = _train(_Run(cfg, config, rdir, state, run_id, logger))
        total = time.time() - t_flow
        timings = {**result["timings"], "orchestration": total - sum(result["timings"].values())}
        summary_metrics = {f"time/total_{k}_s": v for k, v in timings.items()}
        summary_metrics["time/flow_s"] = total
        summary_metrics["sys/peak_rss_gb"] = _peak_rss_gb()
        tracking.log_metrics(cfg.run, run_id, summary_metrics, cfg.trainer.steps)
        tracking.flush()  # every step's metrics stored before the run is FINISHED
        tracking.stop_system_metrics(monitor)
        interrupts.check()  # a stop that came after the last check is not lost: the run is KILLED, not FINISHED
        with interrupts.deferred():  # from here a stop is recorded (the CLI then exits non-zero), not half-done
            tracking.finish_run(cfg.run, run_id)
            state.finished = True
            state.save(rdir)
    except BaseException as exc:
        with interrupts.deferred():  # a second signal must not leave the run RUNNING
            _flush_quietly(logger)
            tracking.stop_system_metrics(monitor)
            status = tracking.fail_run(cfg.run, run_id, exc)
        # said here, where it happens (not by the caller, which cannot tell whether the run got this far)
        logger.error("MLflow run %s is marked %s (tag resrl.error); running the same config again continues "
                     "in that run. See: %s", run_id, status, tracking.run_url_hint(cfg.run))
        raise
    finally:
        tracking.stop_system_metrics(monitor)  # (stopped already, unless something above raised first)
        from resrl.session import close_session

        close_session(str(rdir))  # free the engines; a later call starts from the checkpoint
    return {"run_dir": str(rdir), "mlflow_run_id": run_id, "tracking_uri": uri, "final_eval": result["final_eval"],
            "timings": timings, "peak_rss_gb": summary_metrics["sys/peak_rss_gb"], "already_finished": False}


def _flush_quietly(logger) -> None:
    """Store what is queued before a failed run is marked; a logging error is said, not raised over
    the error that failed the run (the steps it lost are logged again on resume from the checkpoint)."""
    try:
        tracking.flush()
    except Exception as exc:  # noqa: BLE001
        logger.warning("some queued MLflow metrics were not stored: %s", exc)


def _open_state(cfg, rdir: Path, logger) -> RunState:
    """The run folder's state, checked: a folder whose state.json is gone is recovered (never
    trained again from step 0 into a second MLflow run), and a resume starts from the newest
    intact checkpoint (a damaged newer one is set aside with a warning naming the file)."""
    chash = config_hash(cfg)
    if not RunState.path(rdir).is_file() and RunState.has_traces(rdir):
        _recover_state(cfg, rdir, chash, logger)
    state = RunState.open(rdir, chash, resume=cfg.run.resume)
    if state.step > 0 and not state.finished:
        ckpt, warnings = resume_checkpoint(rdir, state.step)
        for line in warnings:
            logger.warning(line)
        if step_of(ckpt) != state.step:
            state.step = step_of(ckpt)
            state.save(rdir)
    return state


def _recover_state(cfg, rdir: Path, chash: str, logger) -> None:
    """Rebuild a lost state.json: the step and MLflow run id from the newest committed checkpoint's
    manifest, or (no checkpoint yet) the MLflow run tagged with this run folder."""
    committed = [c for c in list_checkpoints(rdir) if (c / MANIFEST).is_file()]
    step, run_id = 0, None
    if committed:
        ckpt, warnings = resume_checkpoint(rdir, step_of(committed[-1]))
        for line in warnings:
            logger.warning(line)
        manifest = read_manifest(ckpt) or {}
        if manifest.get("config_hash", chash) != chash:
            raise ConfigError(f"run folder {rdir} holds a run with a different config (hash "
                              f"{manifest['config_hash']}, now {chash}); set run.name to a new name")
        step, run_id = step_of(ckpt), manifest.get("mlflow_run_id")
    if run_id is None:
        run_id = tracking.find_run_for_folder(cfg.run, rdir)
    if run_id is None and not committed:
        return  # nothing of this run was committed or reached MLflow: starting afresh loses nothing
    if run_id is None:
        raise UserError(f"run folder {rdir} holds a run's work but no state.json, and neither a committed "
                        "checkpoint nor MLflow names its run; restore state.json, or delete the folder (or set "
                        "run.name) to train the run again")
    state = RunState(config_hash=chash, step=step, mlflow_run_id=run_id)
    state.finished = step == cfg.trainer.steps and tracking.run_status(cfg.run, run_id) == "FINISHED"
    state.save(rdir)
    logger.warning("run folder %s had no state.json: recovered at step %d, MLflow run %s%s", rdir, step, run_id,
                   " (finished)" if state.finished else "")


def _train(run: _Run) -> dict:
    """Data preparation, then rollout -> update per step with evaluations; returns timings and the last eval."""
    cfg, state = run.cfg, run.state
    prepared = prepare_data(run.config)
    for line in prepared["summary_lines"]:
        run.logger.info("data: %s", line)
    run.logger.info("policy: %s (warm-start %s)", prepared["policy_dir"],
                    {None: "off", "cache": "reused from cache", "trained": "trained now",
                     "published": "the project's published build, checked by sha256"}[prepared["warmstart_source"]])
    if not state.data_logged and state.step == 0 and not state.evaluated:  # once per run, also across resumes
        if not tracking.logged_steps(cfg.run, run.run_id, next(iter(prepared["metrics"]))):  # (unless logged, killed)
            tracking.log_metrics(cfg.run, run.run_id, prepared["metrics"], 0)
            tracking.log_datasets(cfg, run.run_id, prepared["dataset_dir"])  # the train/test inputs
        state.data_logged = True
        state.save(run.rdir)
    if state.step > 0:  # the last commit's metrics, if an interruption kept them from MLflow
        tracking.log_step_metrics(cfg.run, run.run_id, load_step_metrics(checkpoint_dir(run.rdir, state.step)),
                                  only_missing=True)

    steps = cfg.trainer.steps
    timed: list[dict] = []  # the metrics of every step and evaluation, in order: their time/* add up
    last_eval: dict = {}
    interrupts.check()
    if missed_eval(state.step, state.evaluated, cfg):  # step 0, or an evaluation an interruption skipped
        last_eval = _evaluate(run, prepared, state.step)
        timed.append(last_eval)
    for step in range(state.step + 1, steps + 1):
        interrupts.check()  # a Ctrl-C that a destructor swallowed stops the run here
        timed.append(_rl_step(run, prepared, step))
        if eval_due(step, cfg):
            interrupts.check()
            last_eval = _evaluate(run, prepared, step)
            timed.append(last_eval)
    interrupts.check()  # after the last evaluation too
    final_policy = policy_dir(checkpoint_dir(run.rdir, steps)) if steps > 0 else Path(prepared["policy_dir"])
    tracking.log_policy(cfg, run.run_id, final_policy)
    return {"timings": _timings(prepared["seconds"], timed), "final_eval": last_eval}


def _rl_step(run: _Run, prepared: dict, step: int) -> dict:
    """Rollouts and the update; at a checkpoint, the commit, then the metrics of the steps it
    commits go to MLflow. So a step is in MLflow once, whatever interrupts the run: one
    that was not committed is redone, unlogged; one that was is logged on resume if needed."""
    cfg = run.cfg
    roll = generate_rollouts(run.config, prepared, step)
    upd = update_policy(run.config, prepared, roll["path"], step)
    metrics = {**roll["metrics"], **upd["metrics"]}
    run.uncommitted.append((step, metrics))
    errors = int(metrics["train/reward_errors"])  # failed reward calls, scored 0 (see reward.max_error_fraction)
    # the sampler-trainer gap, or that the sampler's log-probs were the old ones (trainer.sampler_scores)
    agreement = "old logp from sampler" if metrics.get("train/old_logp_from_sampler") else \
        f"sampler dlogp {metrics.get('train/sampler_logp_diff_max', float('nan')):.1e}"
    run.logger.info("step %d/%d | reward %.3f | pass %.3f | len %.1f | loss %.4f | gnorm %.3f | "
                    "w_neg %.3f | dlogp+ %.3f | %s | %.1fs rollout %.1fs update%s", step,
                    cfg.trainer.steps, metrics["train/reward_mean"], metrics["train/pass_rate"],
                    metrics["train/response_length"], metrics["train/loss"], metrics["train/grad_norm"],
                    metrics.get("train/resrl/weight_mean", float("nan")), metrics.get("train/disp/seq_logp_change", float("nan")),
                    agreement, metrics["time/rollout_s"],
                    metrics["time/update_s"], f" | reward errors {errors}" if errors else "")
    if upd["checkpoint"]:
        save_step_metrics(Path(upd["checkpoint"]), run.uncommitted)
        write_manifest(Path(upd["checkpoint"]), step, mlflow_run_id=run.run_id, config_hash=run.state.config_hash)
        # The steps committed before are stored before this commit: only the newest commit's metrics
        # can be in flight (queued below), and those are in its checkpoint to log again on a resume.
        tracking.flush()
        run.state.step = step
        run.state.save(run.rdir)  # the commit
        # only_missing: a step redone after a resume fell back past a damaged checkpoint is in MLflow already
        tracking.log_step_metrics(cfg.run, run.run_id, run.uncommitted, only_missing=True, synchronous=False)
        run.uncommitted = []
        prune_checkpoints(run.rdir, cfg.run.keep_checkpoints, committed=step)
    return metrics


def _evaluate(run: _Run, prepared: dict, step: int) -> dict:
    """Held-out evaluation at `step`, logged to MLflow (files, then metrics) and recorded as done
    in the run's state. An evaluation whose metrics are in MLflow already (an interruption came
    before the state was saved) is only recorded, not repeated."""
    cfg = run.cfg
    if step in tracking.logged_steps(cfg.run, run.run_id, pass_key(1)):
        run.state.evaluated = sorted(set(run.state.evaluated) | {step})
        run.state.save(run.rdir)
        return {}
    result = evaluate_policy(run.config, prepared, step, final=step == cfg.trainer.steps)
    tracking.log_eval_files(cfg.run, run.run_id, Path(result["samples_file"]), Path(result["plot_file"]),
                            artifact_dir=f"eval/{Path(result['dir']).name}")
    tracking.log_metrics(cfg.run, run.run_id, result["metrics"], step)
    run.state.evaluated = sorted(set(run.state.evaluated) | {step})
    run.state.save(run.rdir)
    m = result["metrics"]
    k = int(m[EVAL_K])
    errors = int(m["eval/reward_errors"])
    run.logger.info("eval step %d: avg@%d %.3f | pass@%d %.3f | pass@1 %.3f%s", step, k,
                    m[avg_key(k)], k, m[pass_key(k)], m[pass_key(1)],
                    f" | reward errors {errors}" if errors else "")
    return m


def _timings(prepare_s: float, timed: list[dict]) -> dict[str, float]:
    """Seconds per part of the run, from the time/* metrics of its steps and evaluations."""
    def total(*keys: str) -> float:
        return sum(sum(m.get(k, 0.0) for k in keys) for m in timed)

    return {"prepare": prepare_s, "engine_start": total("time/engine_start_s"), "rollout": total("time/rollout_s"),
            "update": total("time/update_s", "time/weight_sync_s"), "eval": total("time/eval_s")}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
