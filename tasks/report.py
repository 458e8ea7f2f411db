"""A sweep's record in MLflow and its comparison report.

The sweep's parent MLflow run (tagged `resrl.sweep_id`, `resrl.role=sweep`) holds the
sweep file (`sweep.yaml`) and the list of its points (`points.json`); the report is
built from those and the points' own runs alone, so `resrl compare` can rebuild it
anywhere the store is reachable. The tables and plots are drawn by resrl/report.py.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from resrl.errors import ConfigError
from resrl.metrics import EVAL_K, EVAL_PREFIX, is_avg_key, is_pass_key, k_of, pass_key
from resrl.report import curve_area, write_report
from resrl.sweep import report_settings
from tasks import tracking

SPEC_FILE = "sweep.yaml"
POINTS_FILE = "points.json"


def find_sweep_run(run_cfg, sweep_id: str) -> str | None:
    """The id of sweep `sweep_id`'s parent MLflow run in the `run` section's experiment, or None."""
    found = tracking.search_runs(run_cfg, f"tags.`resrl.sweep_id` = '{sweep_id}' and tags.`resrl.role` = 'sweep'")
    return found[0].info.run_id if found else None


def start_or_resume_sweep_run(run_cfg, sweep_id: str, spec: dict) -> str:
    """The sweep's parent MLflow run (in the store the `run` section names): found by its sweep id,
    else created; given the sweep file."""
    tracking.ensure_experiment(run_cfg)
    run_id = find_sweep_run(run_cfg, sweep_id)
    if run_id is None:
        run_id = tracking.start_run(run_cfg, sweep_id, tags={"resrl.sweep_id": sweep_id, "resrl.role": "sweep"})
    # written again on every start: the same points with new report settings re-report, nothing retrains
    tracking.client_for(run_cfg).log_text(run_id, yaml.safe_dump(spec, sort_keys=False), SPEC_FILE)
    return run_id


def log_points(run_cfg, run_id: str, points: list[dict]) -> None:
    """The sweep's points (swept values, run name, MLflow run id, status) on its parent run."""
    tracking.client_for(run_cfg).log_text(run_id, json.dumps(points, indent=1), POINTS_FILE)


def final_eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The run's last evaluation: Avg@K and Pass@k for k <= K, K = `eval/k` of that evaluation.

    MLflow keeps each key's latest value; when the last evaluation draws more samples
    (`eval.final_k`) the earlier, smaller `eval/avg_at_k` would otherwise linger."""
    k_final = int(metrics.get(EVAL_K, 0))
    out = {}
    for key, value in metrics.items():
        if is_avg_key(key):
            if not k_final or k_of(key) == k_final:
                out[key] = value
        elif is_pass_key(key):
            if not k_final or k_of(key) <= k_final:
                out[key] = value
        elif key.startswith(EVAL_PREFIX) and key != EVAL_K:
            out[key] = value
    return out


def sweep_runs(run_cfg, sweep_id: str) -> tuple[str, pd.DataFrame, dict, list[str]]:
    """Parent run id, one row per point (params of the swept keys + final eval metrics), the spec,
    and the swept keys (as recorded in points.json, in the order the sweep file gives them), read
    from the store the `run` section names."""
    client = tracking.client_for(run_cfg)
    parent = find_sweep_run(run_cfg, sweep_id)
    if parent is None:
        raise ConfigError(f"no sweep '{sweep_id}' in the MLflow store {tracking.tracking_uri(run_cfg)} "
                          f"(experiment '{run_cfg.experiment}')")
    with tempfile.TemporaryDirectory() as tmp:
        points = json.loads(Path(client.download_artifacts(parent, POINTS_FILE, tmp)).read_text())
        spec = yaml.safe_load(Path(client.download_artifacts(parent, SPEC_FILE, tmp)).read_text())
    rows = []
    for p in points:
        row = {"run_name": p["run_name"], "status": p["status"], "mlflow_run_id": p["mlflow_run_id"]}
        row.update(p["values"])  # every swept key, from the point's resolved config
        if p["mlflow_run_id"]:
            try:
                run = client.get_run(p["mlflow_run_id"])
                histories = {metric: {m.step: m.value for m in client.get_metric_history(p["mlflow_run_id"], metric)}
                             for metric in ("train/lld", "train/disp/seq_logp_change", pass_key(1))}
            except Exception as exc:  # noqa: BLE001 - a deleted run is one point without data, not a lost report
                row["status"] = f"{p['status']} (MLflow run unreadable: {type(exc).__name__})"
                rows.append(row)
                continue
            row["status"] = "finished" if run.info.status == "FINISHED" else p["status"]
            row.update(final_eval_metrics(run.data.metrics))
            for metric, column, mean_key in (("train/lld", "lld_curve", "train/lld_mean"),
                                             ("train/disp/seq_logp_change", "disp_curve", "train/disp_mean")):
                history = histories[metric]
                row[column] = dict(sorted(history.items()))
                finite = [v for v in history.values() if v == v]
                row[mean_key] = sum(finite) / len(finite) if finite else float("nan")
            row["curve/pass_at_1_area"] = curve_area(histories[pass_key(1)])
        rows.append(row)
    swept = list(dict.fromkeys(k for p in points for k in p["values"]))
    return parent, pd.DataFrame(rows), spec, swept


REPORT_TAG = "resrl.report"              # complete | partial (some parts failed) | failed
REPORT_ERROR_TAG = "resrl.report_error"  # what failed, when something did


def build_report(run_cfg, sweep_id: str) -> dict:
    """Write the comparison report from MLflow data (the `run` section's store) under
    run.output_dir/sweeps/<sweep_id> and log it to the sweep's parent run.

    A part of the report that fails (a plot, the paired table) leaves the others written; the
    parent run is tagged `resrl.report` = complete or partial, with the failed parts in
    `resrl.report_error`. An error before any part is written (the store unreadable) raises:
    the sweep marks the report failed (`report_failed`)."""
    parent, runs, spec, swept = sweep_runs(run_cfg, sweep_id)
    group_keys = [k for k in swept if k != "seed" and k in runs.columns]
    settings = report_settings(spec)
    out = Path(run_cfg.output_dir) / "sweeps" / sweep_id
    errors: dict[str, str] = {}
    files = write_report(runs, out, sweep_id=sweep_id, group_keys=group_keys, headline=settings.headline,
                         heatmap=settings.heatmap, reference=settings.reference, primary=settings.primary,
                         errors=errors)
    client = tracking.client_for(run_cfg)
    for path in files.values():
        client.log_artifact(parent, str(path), artifact_path="report")
    client.set_tag(parent, REPORT_TAG, "partial" if errors else "complete")
    if errors:
        client.set_tag(parent, REPORT_ERROR_TAG, "; ".join(f"{k}: {v}" for k, v in errors.items())[:4000])
    elif REPORT_ERROR_TAG in client.get_run(parent).data.tags:  # left by an earlier, failed report
        client.delete_tag(parent, REPORT_ERROR_TAG)
    return {"dir": str(out), "markdown": files["markdown"].read_text(), "files": files, "errors": errors,
            "parent": parent, "runs": runs, "group_keys": group_keys, "headline": settings.headline, "spec": spec}


def register_best(run_cfg, report: dict, sweep_id: str) -> dict | None:
    """Register the best point's final policy (resrl.report.best_point on the headline metric) in
    the Model Registry of the `run` section's store under the sweep's `register` name with the
    alias `best`, and tag the parent run with it. Returns {"name", "version", "run_name", "value"},
    or None when nothing is registered (`register: null`, no finished point with the metric, or the
    point logged no model)."""
    from resrl.report import best_point
    from resrl.sweep import registry_name

    name = registry_name(report["spec"], sweep_id)
    best = best_point(report["runs"], report["group_keys"], report["headline"]) if name else None
    if best is None or not best.get("mlflow_run_id"):
        return None
    version = tracking.register_model(run_cfg, name, best["mlflow_run_id"], alias="best")
    if version is None:
        return None
    client = tracking.client_for(run_cfg)
    client.set_tag(report["parent"], "resrl.best_model", f"models:/{name}@best (version {version}, {best['run_name']})")
    return {"name": name, "version": version, "run_name": best["run_name"], "value": best[report["headline"]]}


def report_failed(run_cfg, parent_run_id: str, exc: BaseException) -> str:
    """Tag the sweep's parent run with a failed report (`resrl.report=failed`, the error in
    `resrl.report_error`); returns the error as one line. The sweep itself is not failed by it."""
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:4000]
    client = tracking.client_for(run_cfg)
    client.set_tag(parent_run_id, REPORT_TAG, "failed")
    client.set_tag(parent_run_id, REPORT_ERROR_TAG, error)
    return error
