"""Parameter sweeps: every grid point is a child flow run of the training flow, trained in
one of `concurrency` lane processes (each point with its own vLLM and DeepSpeed engines),
logging to a child MLflow run under one parent run tagged with the sweep id. When the
points are done, the comparison report goes to the parent run and to the Prefect
flow run. `resrl compare SWEEP_ID` rebuilds the report from MLflow alone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from prefect import flow, get_run_logger

from resrl.config import ConfigError, load_config, run_dir, run_name, to_dict
from resrl.report import write_report
from resrl.run_state import RunState
from resrl.sweep import load_sweep
from tasks import tracking

POINTS_FILE = "points.json"


def _find_parent(cfg, sweep_id: str) -> str | None:
    found = tracking.search_runs(cfg, f"tags.`resrl.sweep_id` = '{sweep_id}' and tags.`resrl.role` = 'sweep'")
    return found[0].info.run_id if found else None


def _parent_run(cfg, sweep) -> str:
    """The sweep's parent MLflow run: found by its sweep id, else created."""
    tracking.ensure_experiment(cfg)
    run_id = _find_parent(cfg, sweep.sweep_id)
    if run_id is None:
        run_id = tracking.start_run(cfg, sweep.sweep_id, tags={"resrl.sweep_id": sweep.sweep_id, "resrl.role": "sweep"})
    # written again on every start: the same points with new report settings re-report, nothing retrains
    tracking.client_for(cfg).log_text(run_id, yaml.safe_dump(sweep.spec, sort_keys=False), "sweep.yaml")
    return run_id


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

    from flows.train import train_flow

    logger = get_run_logger()
    sweep = load_sweep(sweep_file, overrides or [])
    cfg0 = sweep.points[0].cfg
    stores = {tracking.tracking_uri(p.cfg) for p in sweep.points}
    if len(stores) > 1:
        raise ConfigError(f"all points of a sweep must log to one MLflow store, got {sorted(stores)}")
    # Create the store (and its schema) once, before parallel runs touch it.
    parent_id = _parent_run(cfg0, sweep)
    logger.info("sweep %s: %d points, concurrency %d, MLflow parent run %s", sweep.sweep_id, len(sweep.points),
                sweep.concurrency, parent_id)

    status: dict[str, str] = {}
    pending = []
    for p in sweep.points:
        state = RunState.load(run_dir(p.cfg))
        if state is not None and state.finished:
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
        state = RunState.load(run_dir(p.cfg))
        if state is not None and state.finished:
            status[p.key] = "finished"
        else:
            status[p.key] = "failed" if (claims / p.key).exists() else "not started (its lane died)"
        logger.info("point %s: %s", p.label(()), status[p.key])
    shutil.rmtree(claims, ignore_errors=True)

    from omegaconf import OmegaConf

    swept = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
    points = []
    for p in sweep.points:
        state = RunState.load(run_dir(p.cfg))
        points.append({"key": p.key, "overrides": p.overrides, "run_name": run_name(p.cfg),
                       "values": {k: OmegaConf.select(p.cfg, k) for k in swept},
                       "run_dir": str(run_dir(p.cfg)), "mlflow_run_id": state.mlflow_run_id if state else None,
                       "status": status[p.key]})
    client = tracking.client_for(cfg0)
    client.log_text(parent_id, json.dumps(points, indent=1), POINTS_FILE)
    report = build_report(cfg0, sweep.sweep_id)
    create_markdown_artifact(report["markdown"], key="sweep-report", description=f"Sweep {sweep.sweep_id}")
    finished = sum(s == "finished" for s in status.values())
    client.set_terminated(parent_id, status="FINISHED" if finished == len(points) else "FAILED")
    return {"sweep_id": sweep.sweep_id, "parent_run_id": parent_id, "points": points,
            "report_dir": report["dir"], "tracking_uri": tracking.tracking_uri(cfg0)}


def final_eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The run's last evaluation: Avg@K and Pass@k for k <= K, K = `eval/k` of that evaluation.

    MLflow keeps each key's latest value; when the last evaluation draws more samples
    (`eval.final_k`) the earlier, smaller `eval/avg_at_k` would otherwise linger."""
    k_final = int(metrics.get("eval/k", 0))
    out = {}
    for key, value in metrics.items():
        if key.startswith("eval/avg_at_"):
            if not k_final or int(key.rsplit("_", 1)[1]) == k_final:
                out[key] = value
        elif key.startswith("eval/pass_at_"):
            if not k_final or int(key.rsplit("_", 1)[1]) <= k_final:
                out[key] = value
        elif key.startswith("eval/") and key != "eval/k":
            out[key] = value
    return out


def sweep_runs(cfg, sweep_id: str) -> tuple[str, pd.DataFrame, dict, list[str]]:
    """Parent run id, one row per point (params of the swept keys + final eval metrics), the spec,
    and the swept keys (as recorded in points.json, in the order the sweep file gives them)."""
    client = tracking.client_for(cfg)
    parent = _find_parent(cfg, sweep_id)
    if parent is None:
        raise ConfigError(f"no sweep '{sweep_id}' in the MLflow store {tracking.tracking_uri(cfg)} "
                          f"(experiment '{cfg.run.experiment}')")
    with tempfile.TemporaryDirectory() as tmp:
        points = json.loads(Path(client.download_artifacts(parent, POINTS_FILE, tmp)).read_text())
        spec = yaml.safe_load(Path(client.download_artifacts(parent, "sweep.yaml", tmp)).read_text())
    rows = []
    for p in points:
        row = {"run_name": p["run_name"], "status": p["status"], "mlflow_run_id": p["mlflow_run_id"]}
        row.update(p["values"])  # every swept key, from the point's resolved config
        if p["mlflow_run_id"]:
            run = client.get_run(p["mlflow_run_id"])
            row["status"] = "finished" if run.info.status == "FINISHED" else p["status"]
            row.update(final_eval_metrics(run.data.metrics))
            lld = {m.step: m.value for m in client.get_metric_history(p["mlflow_run_id"], "train/lld")}
            row["lld_curve"] = dict(sorted(lld.items()))
            finite = [v for v in lld.values() if v == v]
            row["train/lld_mean"] = sum(finite) / len(finite) if finite else float("nan")
        rows.append(row)
    swept = list(dict.fromkeys(k for p in points for k in p["values"]))
    return parent, pd.DataFrame(rows), spec, swept


def build_report(cfg, sweep_id: str) -> dict:
    """Write the comparison report from MLflow data and log it to the sweep's parent run."""
    parent, runs, spec, swept = sweep_runs(cfg, sweep_id)
    group_keys = [k for k in swept if k != "seed" and k in runs.columns]
    report_cfg = spec.get("report") or {}
    out = Path(cfg.run.output_dir) / "sweeps" / sweep_id
    files = write_report(runs, out, sweep_id=sweep_id, group_keys=group_keys,
                         headline=report_cfg.get("headline", "eval/pass_at_1"),
                         heatmap=list(report_cfg.get("heatmap") or []), reference=report_cfg.get("reference"))
    client = tracking.client_for(cfg)
    for path in files.values():
        client.log_artifact(parent, str(path), artifact_path="report")
    return {"dir": str(out), "markdown": files["markdown"].read_text(), "files": files}


# ----------------------------------------------------------------------------- CLI

def run_sweep_cli(args) -> int:
    from tasks.tracking import run_url_hint

    sweep = load_sweep(args.config, args.overrides)  # checks every point before anything starts
    tracking.open_store(sweep.points[0].cfg)  # an unreachable server fails now; a new SQLite store is created once
    print(f"resrl: sweep {sweep.sweep_id}: {len(sweep.points)} points, concurrency {sweep.concurrency}", flush=True)
    result = sweep_flow(sweep_file=args.config, overrides=args.overrides)
    print()
    for p in result["points"]:
        print(f"  {p['status']:<28} {p['run_name']:<22} {p['overrides']}")
    print(f"report:        {result['report_dir']}/report.md")
    print(f"MLflow parent: {result['parent_run_id']}  (store: {result['tracking_uri']})")
    print(f"see it with:   {run_url_hint(sweep.points[0].cfg)}")
    print(f"rebuild with:  resrl compare {result['sweep_id']}" + (f" --config {args.config}" if args.config else ""))
    return 0 if all(p["status"] == "finished" for p in result["points"]) else 1


def compare_cli(args) -> int:
    spec = yaml.safe_load(Path(args.config).read_text()) if args.config and Path(args.config).is_file() else {}
    if {"grid", "points"} & set(spec or {}):
        cfg = load_sweep(args.config, args.overrides).points[0].cfg  # a sweep file: use its store
    else:
        cfg = load_config(args.config, args.overrides)
    report = build_report(cfg, args.sweep_id)
    print(report["markdown"])
    print(f"written to {report['dir']}")
    return 0
