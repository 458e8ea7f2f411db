"""MLflow bookkeeping: where the store is, one run per training flow run.

It holds no Prefect tasks: it is the MLflow layer that tasks/report.py, the flows and the CLI share,
kept here because resrl/ must import without MLflow (tests/test_imports.py). Functions take the
config's `run` section (the store and the experiment); the few that read other sections too take
the whole config.

Everything goes through `MlflowClient` with explicit run ids (no global "active
run"), so several runs can log from one process without stepping on each other.
"""
from __future__ import annotations

import fcntl
import http.client
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

from resrl.config import flatten
from resrl.errors import UserError

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(run_cfg) -> str:
    """The `run` section's tracking_uri, else $MLFLOW_TRACKING_URI, else an SQLite store in run.output_dir."""
    if run_cfg.tracking_uri:
        return run_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_cfg.output_dir).resolve() / 'mlflow.db'}"


def local_artifact_root(run_cfg) -> str:
    """Where a local store keeps artifacts: `mlartifacts` in the `run` section's output_dir."""
    return str(Path(run_cfg.output_dir).resolve() / "mlartifacts")


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


class TrackingUnreachable(UserError):
    """The tracking server does not answer."""


_OPENED: set[str] = set()  # stores this process has checked (and, for SQLite, created)


def open_store(run_cfg) -> str:
    """Check the `run` section's store once per process, in seconds, before any heavy work; returns its URI.

    - a tracking server must answer a short request (MLflow's own client retries for
      minutes before it gives up on an unreachable server);
    - a new SQLite store is created under an flock on `<db>.lock`: its schema migration
      crashes when several processes run it at once (parallel runs, sweeps)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(run_cfg)
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


def check_writable_folders(run_cfg) -> None:
    """The `run` section's output_dir, cache_dir and (local store) the MLflow store's folders:
    NotWritable now, naming the folder, rather than a traceback in the middle of the run."""
    from resrl.errors import check_writable

    check_writable(run_cfg.output_dir, "run.output_dir")
    check_writable(run_cfg.cache_dir, "run.cache_dir")
    uri = tracking_uri(run_cfg)
    if uri.startswith("sqlite:///"):
        check_writable(Path(uri[len("sqlite:///"):]).parent, "the MLflow store's folder")
    if is_local_store(uri):
        check_writable(local_artifact_root(run_cfg), "the MLflow artifact folder")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnreachable unless something answers HTTP at `uri`."""
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
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def client_for(run_cfg):
    """An MlflowClient on the `run` section's store (opened first: `open_store`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=open_store(run_cfg))


def ensure_experiment(run_cfg) -> str:
    """Experiment id for the `run` section's experiment; created (with a pinned artifact root for
    local stores) if needed.

    It is tagged as MLflow's "custom model development" kind (the UI asks otherwise).
    """
    client = client_for(run_cfg)
    exp = client.get_experiment_by_name(run_cfg.experiment)
    if exp is None:
        location = None
        if is_local_store(tracking_uri(run_cfg)):
            location = Path(local_artifact_root(run_cfg)).as_uri()
        try:
            client.create_experiment(run_cfg.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another process
            if client.get_experiment_by_name(run_cfg.experiment) is None:
                raise
        exp = client.get_experiment_by_name(run_cfg.experiment)
    for key, value in EXPERIMENT_TAGS.items():  # also on experiments created before the tag was set
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def start_run(run_cfg, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A new MLflow run in the `run` section's experiment (nested under `parent_run_id` if given); its id."""
    client = client_for(run_cfg)
    exp_id = ensure_experiment(run_cfg)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def search_runs(run_cfg, filter_string: str, order_by: list[str] | None = None) -> list:
    """Runs of the `run` section's experiment matching an MLflow filter; none when the experiment
    does not exist yet."""
    client = client_for(run_cfg)
    exp = client.get_experiment_by_name(run_cfg.experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string, order_by=order_by) if exp else []


def log_config_params(cfg, run_id: str) -> None:
    """Every key of the whole config as a run param (values cut to MLflow's length limit)."""
    from mlflow.entities import Param

    client = client_for(cfg.run)
    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])


_PENDING: list = []  # this process's asynchronous log calls not yet known to be stored (RunOperations)
NONFINITE_SUFFIX = "_nonfinite"


def log_metrics(run_cfg, run_id: str, metrics: dict[str, float], step: int, synchronous: bool = True) -> None:
    """Metrics at `step`, in the `run` section's store. MLflow drops NaN silently (a chart just lacks
    the point): a value that is NaN or infinite is logged as `<key>_nonfinite` = 1 at that step
    instead, which the UI shows.
    With synchronous=False the call returns at once and MLflow's background queue stores them;
    `flush()` waits until they are stored (and raises if they could not be)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for k, v in metrics.items():
        if v is None:
            continue
        if math.isfinite(float(v)):
            batch.append(Metric(k, float(v), now, step))
        else:
            batch.append(Metric(k + NONFINITE_SUFFIX, 1.0, now, step))
    client = client_for(run_cfg)
    for i in range(0, len(batch), 1000):
        ops = client.log_batch(run_id, metrics=batch[i:i + 1000], synchronous=synchronous)
        if not synchronous and ops is not None:
            _PENDING.append(ops)


def flush() -> None:
    """Wait for every asynchronous log call of this process to be stored; raises (MlflowException)
    when one failed. (`mlflow.flush_async_logging()` flushes only the default tracking URI's store;
    the RunOperations each call returned name exactly what this process queued.)"""
    while _PENDING:
        _PENDING.pop(0).wait()


def logged_steps(run_cfg, run_id: str, key: str) -> set[int]:
    """The steps at which `key` is in the MLflow run (in the `run` section's store)."""
    return {m.step for m in client_for(run_cfg).get_metric_history(run_id, key)}


def log_step_metrics(run_cfg, run_id: str, entries: list[tuple[int, dict]], only_missing: bool = False,
                     synchronous: bool = True) -> None:
    """Each (step, metrics); with only_missing, just the steps whose train/reward_mean is not
    in MLflow yet (after an interruption between a commit and its logging)."""
    done = logged_steps(run_cfg, run_id, "train/reward_mean") if only_missing else set()
    for step, metrics in entries:
        if step not in done:
            log_metrics(run_cfg, run_id, metrics, step, synchronous=synchronous)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default (and run_url_hint starts it)


def run_page(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its model-training view. MLflow 3.17 picks the
    GenAI view for any experiment unless the address asks (the mlflow.experimentKind tag,
    set on our experiment too, is no longer what decides; checked in headless Chromium)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_url_hint(run_cfg, run_id: str | None = None, experiment_id: str | None = None) -> str:
    """How to see the `run` section's store (and, given a run id, that run's page) in the MLflow UI."""
    uri = tracking_uri(run_cfg)
    local = is_local_store(uri)
    hint = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if local else f"open {uri}"
    if run_id:
        exp_id = experiment_id or client_for(run_cfg).get_run(run_id).info.experiment_id
        return f"{hint}{', then open' if local else ':'} {run_page(LOCAL_UI if local else uri, exp_id, run_id)}"
    return hint if local else f"{hint} in a browser"


def announce_run(run_cfg, run_id: str) -> None:
    """A Prefect artifact on the current flow run that points at its MLflow run (in the `run` section's
    store)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    uri = tracking_uri(run_cfg)
    exp_id = client_for(run_cfg).get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        create_link_artifact(link=run_page(uri, exp_id, run_id), link_text="MLflow run",
                             key="mlflow-run", description=f"MLflow run {run_id}")
    else:
        create_markdown_artifact(
            markdown=f"MLflow run `{run_id}` (experiment {exp_id}) in `{uri}`.\n\nSee it with:\n\n"
                     f"    {run_url_hint(run_cfg, run_id, exp_id)}\n",
            key="mlflow-run", description=f"MLflow run {run_id}")


# ----------------------------------------------------------------------------- a training run's MLflow run

def start_or_resume_run(cfg, state, run_dir: Path, flow_run_id: str) -> str:
    """The MLflow run of a run folder (`state`, a resrl.run_state.RunState): created on the folder's
    first start, with its tags, params and config.yaml; on a resume set RUNNING again, tagged with
    the new flow run, and cleared of the error an earlier attempt left. Returns its id.

    A new run's id is saved in `state` at once, so an interruption from here on resumes that
    run instead of creating another."""
    from omegaconf import OmegaConf

    from resrl.config import run_name

    client = client_for(cfg.run)
    if state.mlflow_run_id is None:
        tags = {"prefect.flow_run_id": flow_run_id, "resrl.config_hash": state.config_hash,
                "resrl.run_dir": str(Path(run_dir).resolve()), "resrl.algorithm": cfg.algorithm.name}
        if cfg.run.sweep_id:
            tags["resrl.sweep_id"] = cfg.run.sweep_id
        state.mlflow_run_id = start_run(cfg.run, run_name(cfg), tags=tags, parent_run_id=cfg.run.parent_run_id)
        state.save(run_dir)
        log_config_params(cfg, state.mlflow_run_id)
        client.log_text(state.mlflow_run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    else:
        client.set_terminated(state.mlflow_run_id, status="RUNNING")
        client.set_tag(state.mlflow_run_id, "prefect.flow_run_id", flow_run_id)
        if "resrl.error" in client.get_run(state.mlflow_run_id).data.tags:  # from the attempt that failed
            client.delete_tag(state.mlflow_run_id, "resrl.error")
    return state.mlflow_run_id


def find_run_for_folder(run_cfg, run_dir: Path) -> str | None:
    """The newest MLflow run trained in `run_dir` (its `resrl.run_dir` tag) in the `run` section's
    experiment, or None."""
    folder = str(Path(run_dir).resolve())
    if "'" in folder:  # cannot be quoted in MLflow's filter syntax
        return None
    runs = search_runs(run_cfg, f"tags.`resrl.run_dir` = '{folder}'", order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def run_status(run_cfg, run_id: str) -> str:
    """The MLflow run's status (RUNNING, FINISHED, FAILED, KILLED) in the `run` section's store."""
    return client_for(run_cfg).get_run(run_id).info.status


def finish_run(run_cfg, run_id: str, status: str = "FINISHED") -> None:
    """End the MLflow run (in the `run` section's store) with `status`."""
    client_for(run_cfg).set_terminated(run_id, status=status)


def fail_run(run_cfg, run_id: str, exc: BaseException) -> str:
    """Mark the run KILLED (stopped from outside, not broken: Ctrl-C, or SIGTERM, which Prefect
    raises in a running task as TerminationSignal) or FAILED, with the error in the `resrl.error`
    tag; returns the status."""
    from prefect.exceptions import TerminationSignal

    from resrl.interrupts import signal_name

    status = "KILLED" if isinstance(exc, (KeyboardInterrupt, TerminationSignal)) else "FAILED"
    detail = signal_name(exc.signal) if isinstance(exc, TerminationSignal) else exc
    client = client_for(run_cfg)
    client.set_tag(run_id, "resrl.error", f"{type(exc).__name__}: {detail}"[:4000])
    client.set_terminated(run_id, status=status)
    return status


def log_eval_files(run_cfg, run_id: str, samples_file: Path, plot_file: Path, artifact_dir: str) -> None:
    """An evaluation's sample rows (as a table the UI shows) and its Pass@k plot, in the `run` section's store."""
    import pandas as pd

    client = client_for(run_cfg)
    samples = json.loads(Path(samples_file).read_text())
    if samples:
        client.log_table(run_id, data=pd.DataFrame(samples), artifact_file=f"{artifact_dir}/{Path(samples_file).name}")
    client.log_artifact(run_id, str(plot_file), artifact_path=artifact_dir)


def log_policy(cfg, run_id: str, policy_dir: Path) -> str | None:
    """The policy folder as the run's `policy/` artifact (loads with from_pretrained) and, with
    run.log_model, as an MLflow model (`log_policy_model`); returns the model's id (or None)."""
    from omegaconf import OmegaConf

    client_for(cfg.run).log_artifacts(run_id, str(policy_dir), artifact_path="policy")
    if OmegaConf.select(cfg, "run.log_model", default=False):
        return log_policy_model(cfg, run_id, policy_dir)
    return None


POLICY_MODEL_NAME = "policy"
MODEL_ID_TAG = "resrl.model_id"  # on the training run: its final policy's MLflow model


def log_policy_model(cfg, run_id: str, policy_dir: Path, step: int | None = None) -> str:
    """The policy as an MLflow model (pyfunc, tasks/policy_model.py) that is an output of the run:
    it shows under the run's "Logged models", loads with `mlflow.pyfunc.load_model("models:/<id>")`
    without network access, and can be registered. Built with MlflowClient calls for this run id
    (`mlflow.pyfunc.log_model` logs to the process's active run and default store). Returns its id;
    the run is tagged `resrl.model_id`."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from resrl.config import config_hash, run_name

    client = client_for(cfg.run)
    run = client.get_run(run_id)
    step = cfg.trainer.steps if step is None else step
    model = client.create_logged_model(run.info.experiment_id, name=POLICY_MODEL_NAME, source_run_id=run_id,
                                       model_type="causal-lm policy",
                                       params={"algorithm.name": cfg.algorithm.name, "config_hash": config_hash(cfg)},
                                       tags={"resrl.run_name": run_name(cfg)})
    try:
        signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                                   params=ParamSchema([ParamSpec("max_new_tokens", "long", cfg.eval.max_tokens)]))
        requirements = [f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}"
                        for pkg in ("mlflow", "torch", "transformers", "safetensors", "tokenizers")]
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints", "no input example": the signature is given
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(local), python_model=str(Path(__file__).with_name("policy_model.py")),
                artifacts={"policy": str(policy_dir)}, model_config={"max_new_tokens": cfg.eval.max_tokens},
                signature=signature, pip_requirements=requirements,  # given: no inference (no subprocess, no load)
                mlflow_model=mlflow.models.Model(model_id=model.model_id, run_id=run_id,
                                                 artifact_path=model.artifact_location))
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    return model.model_id


def register_model(run_cfg, name: str, run_id: str, alias: str = "best") -> str | None:
    """Register the final policy model of training run `run_id` as a new version of `name` in the
    Model Registry of the `run` section's store (created if needed) and point `alias` at it; nothing
    new when the alias already points at that run's model. Returns the version, or None when the run
    logged no model."""
    from mlflow.exceptions import MlflowException

    client = client_for(run_cfg)
    model_id = client.get_run(run_id).data.tags.get(MODEL_ID_TAG)
    if model_id is None:
        return None
    try:
        client.create_registered_model(name, description="Final policies of resrl runs (tasks/policy_model.py)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        current = client.get_model_version_by_alias(name, alias)
        if current.model_id == model_id or current.run_id == run_id:
            return str(current.version)
    except MlflowException:
        pass  # no such alias yet
    # the files' location as the source: a SQLite registry resolves a models:/ source with the process's
    # default tracking URI, not this client's (it then finds no such model)
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
    client.set_registered_model_alias(name, alias, str(version.version))
    return str(version.version)


# ----------------------------------------------------------------------------- system metrics and datasets

def start_system_metrics(run_cfg, run_id: str):
    """With the `run` section's system_metrics, MLflow's system metrics for the run: a thread
    samples CPU, memory, disk and network (GPU where MLflow finds one) every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds (default 10) and logs them as `system/*`, continuing the run's earlier steps on a resume.
    It is the monitor `mlflow.start_run(log_system_metrics=True)` starts, here for an explicit run
    id. Returns it (stop it with `stop_system_metrics`), or None when off."""
    from omegaconf import OmegaConf

    if not OmegaConf.select(run_cfg, "system_metrics", default=False):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=open_store(run_cfg))
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor's thread and store its last samples (a no-op for None or a stopped one)."""
    if monitor is not None:
        monitor.finish()


def log_datasets(cfg, run_id: str, dataset_dir: str | Path) -> None:
    """The prepared train and test splits as the run's MLflow dataset inputs (context `train` /
    `test`): name `<data.source>-<cache key>`, a digest of the rows, the schema, the row count, and
    the prepared folder as the source."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from resrl.data import load_prepared

    dataset_dir = Path(dataset_dir).resolve()
    prepared = load_prepared(dataset_dir)
    inputs = []
    for split in prepared.keys():
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local folder
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_huggingface(prepared[split], source=str(dataset_dir),
                                              name=f"{cfg.data.source}-{dataset_dir.name}")
        inputs.append(DatasetInput(dataset=ds._to_mlflow_entity(),
                                   tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=split)]))
    client_for(cfg.run).log_inputs(run_id, datasets=inputs)


# ----------------------------------------------------------------------------- reading a run back

def find_run_by_name(run_cfg, name: str):
    """The newest run of the `run` section's experiment named `name`; ConfigError when there is none."""
    from resrl.errors import ConfigError

    runs = search_runs(run_cfg, f"tags.`mlflow.runName` = '{name}'", order_by=["attributes.start_time DESC"])
    if not runs:
        raise ConfigError(f"no MLflow run named '{name}' in {tracking_uri(run_cfg)} "
                          f"(experiment '{run_cfg.experiment}')")
    return runs[0]


def logged_config(run_cfg, run_id: str):
    """The resolved config a training run logged as config.yaml (read from the `run` section's store)."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        return OmegaConf.load(client_for(run_cfg).download_artifacts(run_id, "config.yaml", tmp))


def log_json(run_cfg, run_id: str, data, artifact_file: str) -> None:
    """`data` as the JSON artifact `artifact_file` of the MLflow run (in the `run` section's store)."""
    client_for(run_cfg).log_text(run_id, json.dumps(data, indent=1), artifact_file)
