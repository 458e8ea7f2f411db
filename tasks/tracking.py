"""MLflow bookkeeping: where the store is, one run per training flow run.

Everything goes through `MlflowClient` with explicit run ids (no global "active
run"), so several runs can log from one process without stepping on each other.
"""
from __future__ import annotations

import os
from pathlib import Path

from resrl.config import flatten

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_uri(cfg) -> str:
    """run.tracking_uri, else $MLFLOW_TRACKING_URI, else an SQLite store in run.output_dir."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}"


def local_artifact_root(cfg) -> str:
    return str(Path(cfg.run.output_dir).resolve() / "mlartifacts")


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(cfg) -> str:
    """Experiment id for run.experiment; created (with a pinned artifact root for local stores) if needed.

    Creating an SQLite store runs its schema migration; do this once before starting
    parallel runs against a new store.
    """
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.run.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_local_store(tracking_uri(cfg)):
        location = Path(local_artifact_root(cfg)).as_uri()
    try:
        return client.create_experiment(cfg.run.experiment, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(cfg.run.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(cfg, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    client = client_for(cfg)
    exp_id = ensure_experiment(cfg)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def search_runs(cfg, filter_string: str, order_by: list[str] | None = None) -> list:
    """Runs of run.experiment matching an MLflow filter; none when the experiment does not exist yet."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.run.experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string, order_by=order_by) if exp else []


def log_config_params(cfg, run_id: str) -> None:
    from mlflow.entities import Param

    client = client_for(cfg)
    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])


def log_metrics(cfg, run_id: str, metrics: dict[str, float], step: int) -> None:
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and not (isinstance(v, float) and math.isnan(v))]
    client = client_for(cfg)
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def run_url_hint(cfg) -> str:
    uri = tracking_uri(cfg)
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def announce_run(cfg, run_id: str) -> None:
    """A Prefect artifact on the current flow run that points at its MLflow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    uri = tracking_uri(cfg)
    exp_id = client_for(cfg).get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        create_link_artifact(link=f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}", link_text="MLflow run",
                             key="mlflow-run", description=f"MLflow run {run_id}")
    else:
        create_markdown_artifact(
            markdown=f"MLflow run `{run_id}` (experiment {exp_id}) in `{uri}`.\n\nSee it with:\n\n"
                     f"    {run_url_hint(cfg)}\n", key="mlflow-run", description=f"MLflow run {run_id}")
