"""MLflow bookkeeping: where the store is, one run per training flow run.

Everything goes through `MlflowClient` with explicit run ids (no global "active
run"), so several runs can log from one process without stepping on each other.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from resrl.config import flatten
from resrl.errors import UserError

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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


class TrackingUnreachable(UserError):
    """The tracking server does not answer."""


_OPENED: set[str] = set()  # stores this process has checked (and, for SQLite, created)


def open_store(cfg) -> str:
    """Check the store once per process, in seconds, before any heavy work; returns its URI.

    - a tracking server must answer a short request (MLflow's own client retries for
      minutes before it gives up on an unreachable server);
    - a new SQLite store is created under an flock on `<db>.lock`: its schema migration
      crashes when several processes run it at once (parallel runs, sweeps)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri in _OPENED:
        return uri
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(db.with_name(db.name + ".lock")):
            MlflowClient(tracking_uri=uri)  # creates (migrates) the store when it is new
    _OPENED.add(uri)
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnreachable unless something answers HTTP at `uri`."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answers (e.g. auth or a proxy in front); MLflow's own calls report the details
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, not HTTP
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachable(
            f"the MLflow tracking server {uri} is not reachable ({reason}); start it (bash infra/mlflow-server.sh), "
            "or fix MLFLOW_TRACKING_URI / run.tracking_uri (unset both for a local SQLite store)") from None


@contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path`, waited for; the OS drops it if the holder dies."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=open_store(cfg))


def ensure_experiment(cfg) -> str:
    """Experiment id for run.experiment; created (with a pinned artifact root for local stores) if needed.

    It is tagged as MLflow's "custom model development" kind (the UI asks otherwise).
    """
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.run.experiment)
    if exp is None:
        location = None
        if is_local_store(tracking_uri(cfg)):
            location = Path(local_artifact_root(cfg)).as_uri()
        try:
            client.create_experiment(cfg.run.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another process
            if client.get_experiment_by_name(cfg.run.experiment) is None:
                raise
        exp = client.get_experiment_by_name(cfg.run.experiment)
    for key, value in EXPERIMENT_TAGS.items():  # also on experiments created before the tag was set
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
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


def not_yet_logged(cfg, run_id: str, metrics: dict[str, float], step: int) -> dict[str, float]:
    """The metrics that have no value at `step` yet: a step redone after an interruption between
    logging its metrics and committing it (a killed rank, kill -9) is then not logged twice."""
    client = client_for(cfg)
    return {k: v for k, v in metrics.items() if not any(m.step == step for m in client.get_metric_history(run_id, k))}


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
