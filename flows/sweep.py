"""Parameter sweeps: every grid point is a child flow run of the training flow, trained in
one of `concurrency` lane processes (each point with its own vLLM and DeepSpeed engines),
logging to a child MLflow run under one parent run tagged with the sweep id. When the
points are done, the comparison report (tasks/report.py) goes to the parent run and to
the Prefect flow run. `resrl compare SWEEP_ID` rebuilds the report from MLflow alone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from prefect import flow, get_run_logger

from resrl.config import ConfigError, run_dir, run_name, to_dict
from resrl.run_state import RunState
from resrl.sweep import SweepPoint, load_sweep
from tasks import tracking
from tasks.report import build_report, log_points, register_best, report_failed, start_or_resume_sweep_run


def _point_config(point, sweep_id: str, parent_id: str) -> dict:
    config = to_dict(point.cfg)
    config["run"]["sweep_id"] = sweep_id
    config["run"]["parent_run_id"] = parent_id
    return config


@flow(name="resrl-sweep-lane")
def lane_flow(configs: list[dict], claims_dir: str) -> None:
    """Train sweep points one after another in this process, each as a child flow run.

    A sweep starts `concurrency` lanes; each takes the next point nobody has claimed yet
    (an exclusive file create in `claims_dir`), so lanes balance themselves and a point
    trains once. One process per lane, not per point: the imports (torch, vLLM,
    DeepSpeed, Prefect, MLflow: 20-30 s on 2 cores) and the process start are paid once.
    A point that fails is recorded (FAILED in MLflow, as any run) and the lane goes on.
    """
    from flows.train import train_flow
    from resrl.config import config_hash, from_dict

    logger = get_run_logger()
    for config in configs:
        key = config_hash(from_dict(config))
        try:
            os.close(os.open(Path(claims_dir) / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # another lane has it
        state = train_flow(config=config, return_state=True)
        if state.is_failed() or state.is_crashed():
            logger.warning("point %s: %s", config["run"].get("name") or key, state.message)


@flow(name="resrl-sweep")
def sweep_flow(sweep_file: str, overrides: list[str] | None = None) -> dict:
    """Train every point of the sweep in `sweep_file` (skipping finished ones) and report."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.flow_engine import run_flow_in_subprocess

    logger = get_run_logger()
    sweep = load_sweep(sweep_file, overrides or [])
    cfg0 = sweep.points[0].cfg
    stores = {tracking.tracking_uri(p.cfg) for p in sweep.points}
    if len(stores) > 1:
        raise ConfigError(f"all points of a sweep must log to one MLflow store, got {sorted(stores)}")
    # Create the store (and its schema) once, before parallel runs touch it.
    parent_id = start_or_resume_sweep_run(cfg0, sweep.sweep_id, sweep.spec)
    logger.info("sweep %s: %d points, concurrency %d, MLflow parent run %s", sweep.sweep_id, len(sweep.points),
                sweep.concurrency, parent_id)

    status: dict[str, str] = {}
    pending = []
    for p in sweep.points:
        if _finished(p):
            status[p.key] = "finished"
            logger.info("point %s (%s): finished earlier, skipped", p.label(()), run_name(p.cfg))
        else:
            pending.append(p)
    # children report to this flow's API (the temporary server too, when there is no PREFECT_API_URL)
    from prefect.client.orchestration import get_client

    child_env = {"PREFECT_API_URL": str(get_client(sync_client=True).api_url).rstrip("/")}
    claims = Path(tempfile.mkdtemp(prefix=f"resrl-{sweep.sweep_id}-"))
    configs = [_point_config(p, sweep.sweep_id, parent_id) for p in pending]
    lanes = [run_flow_in_subprocess(lane_flow, env=child_env,
                                    parameters={"configs": configs, "claims_dir": str(claims)})
             for _ in range(min(sweep.concurrency, len(pending)))]
    logger.info("%d points to train in %d lane process(es)", len(pending), len(lanes))
    for lane in lanes:
        lane.join()
    for p in pending:
        if _finished(p):
            status[p.key] = "finished"
        else:
            status[p.key] = "failed" if (claims / p.key).exists() else "not started (its lane died)"
        logger.info("point %s: %s", p.label(()), status[p.key])
    shutil.rmtree(claims, ignore_errors=True)

    swept = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
    points = [_point_record(p, swept, status[p.key]) for p in sweep.points]
    log_points(cfg0, parent_id, points)
    report = make_report(cfg0, sweep.sweep_id, parent_id, logger)
    try:
        create_markdown_artifact(report["markdown"], key="sweep-report", description=f"Sweep {sweep.sweep_id}")
    except Exception as exc:  # noqa: BLE001 - the report is in MLflow and on disk already
        logger.warning("sweep %s: the report's Prefect artifact was not created (%s)", sweep.sweep_id, exc)
    finished = sum(s == "finished" for s in status.values())
    tracking.finish_run(cfg0, parent_id, status="FINISHED" if finished == len(points) else "FAILED")
    return {"sweep_id": sweep.sweep_id, "parent_run_id": parent_id, "points": points,
            "report_dir": report["dir"], "report_error": report["error"], "tracking_uri": tracking.tracking_uri(cfg0)}


def make_report(cfg, sweep_id: str, parent_id: str, logger) -> dict:
    """The sweep's report, never fatal to the sweep: an error is logged on the parent MLflow run
    (`resrl.report=failed` + `resrl.report_error`) and said in the log, and the sweep's outcome is
    that of its points. Returns {"dir", "markdown", "error"} ("dir" None when nothing was written)."""
    try:
        report = build_report(cfg, sweep_id)
    except Exception as exc:  # noqa: BLE001 - the points' runs are done; the report can be rebuilt
        try:
            error = report_failed(cfg, parent_id, exc)
        except Exception:  # noqa: BLE001 - the store itself is the problem: say so in the log
            error = f"{type(exc).__name__}: {exc}"
        logger.error("sweep %s: the report failed (%s); the points are unaffected. Rebuild it with "
                     "`resrl compare %s`.", sweep_id, error, sweep_id, exc_info=True)
        return {"dir": None, "error": error,
                "markdown": f"# Sweep {sweep_id}\n\nThe report failed: `{error}`. Rebuild it with "
                            f"`resrl compare {sweep_id}`.\n"}
    if report["errors"]:
        logger.warning("sweep %s: report parts failed: %s", sweep_id, "; ".join(report["errors"]))
    try:
        best = register_best(cfg, report, sweep_id)
        if best:
            logger.info("sweep %s: best point %s (%s %.3f) registered as models:/%s@best, version %s", sweep_id,
                        best["run_name"], report["headline"], best["value"], best["name"], best["version"])
    except Exception as exc:  # noqa: BLE001 - the report stands without it
        logger.warning("sweep %s: the best point's model was not registered (%s: %s)", sweep_id,
                       type(exc).__name__, exc)
    return {"dir": report["dir"], "markdown": report["markdown"],
            "error": "; ".join(f"{k}: {v}" for k, v in report["errors"].items()) or None}


def _finished(point: SweepPoint) -> bool:
    state = RunState.load(run_dir(point.cfg))
    return state is not None and state.finished


def _point_record(point: SweepPoint, swept: list[str], status: str) -> dict:
    """What points.json says about one point: the report reads it back from MLflow."""
    state = RunState.load(run_dir(point.cfg))
    return {"key": point.key, "overrides": point.overrides, "run_name": run_name(point.cfg),
            "values": {k: OmegaConf.select(point.cfg, k) for k in swept},
            "run_dir": str(run_dir(point.cfg)), "mlflow_run_id": state.mlflow_run_id if state else None,
            "status": status}
