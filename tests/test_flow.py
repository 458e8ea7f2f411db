"""The whole flow through the `resrl` CLI, as a user runs it, against the session's
shared Prefect server: what lands in MLflow, re-runs, and resuming after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_cli, smoke_overrides

REQUIRED_STEP_METRICS = [
    "train/reward_mean", "train/pass_rate", "train/response_length", "train/loss", "train/grad_norm",
    "train/clip_frac", "train/approx_kl", "train/entropy", "train/lld", "train/batch/frac_positive",
    "train/resrl/weight_mean", "train/resrl/weight_min", "train/resrl/weight_std", "train/resrl/alignment",
    "train/resrl/explained_variance", "time/rollout_s", "time/update_s",
]


def client_for(cfg):
    from tasks.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(cfg.run))


def test_smoke_flow_logs_a_complete_mlflow_run(smoke_run, tmp_path):
    cfg, state = smoke_run["cfg"], smoke_run["state"]
    client = client_for(cfg)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and state["finished"]
    from resrl.config import flatten

    for key, value in flatten(cfg).items():  # every resolved config key is a param
        assert run.data.params[key] == str(value)
    steps = cfg.trainer.steps
    for key in REQUIRED_STEP_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, steps + 1)), key
    k = cfg.eval.k
    for step in (0, steps):
        table = [next(m.value for m in client.get_metric_history(run.info.run_id, f"eval/pass_at_{j}")
                      if m.step == step) for j in (1, 2, 4)]
        assert all(0 <= v <= 1 for v in table) and table == sorted(table)
        assert any(m.step == step for m in client.get_metric_history(run.info.run_id, f"eval/avg_at_{k}"))
    warm = next(m.value for m in client.get_metric_history(run.info.run_id, "eval/pass_at_1") if m.step == 0)
    assert 0.05 <= warm <= 0.7, "warm-start should leave a policy that solves some, not all, prompts"
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "policy", "eval"} <= paths
    eval_files = {a.path for a in client.list_artifacts(run.info.run_id, f"eval/step_{steps:05d}")}
    assert {f"eval/step_{steps:05d}/samples.json", f"eval/step_{steps:05d}/pass_at_k.png"} <= eval_files
    assert "mlflow ui --backend-store-uri" in smoke_run["proc"].stdout
    # the run's page, in the UI's model-training view (MLflow 3.17 opens the GenAI view otherwise)
    assert (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning") in smoke_run["proc"].stdout


def test_policy_artifact_loads_and_differs_from_the_start(smoke_run, smoke_prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, state = smoke_run["cfg"], smoke_run["state"]
    # (not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI to the rest of the session)
    local = client_for(cfg).download_artifacts(state["mlflow_run_id"], "policy", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert tok.decode(tok(" 3+4=7. #### 7")["input_ids"]) == " 3+4=7. #### 7"
    start = AutoModelForCausalLM.from_pretrained(smoke_prepared["policy_dir"]).state_dict()
    diffs = [float((v - start[k]).abs().max()) for k, v in model.state_dict().items()]
    assert max(diffs) > 1e-6


def test_mlflow_run_is_tagged_with_the_prefect_flow_run(smoke_run, prefect_api_url):
    from prefect.client.orchestration import get_client
    import asyncio

    run = client_for(smoke_run["cfg"]).get_run(smoke_run["state"]["mlflow_run_id"])
    fr_id = run.data.tags["prefect.flow_run_id"]

    async def read():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as c:
            arts = await c.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr_id])))
            return await c.read_flow_run(fr_id), arts

    flow_run, artifacts = asyncio.run(read())
    assert flow_run.state.is_completed()
    pointer = [a for a in artifacts if a.key == "mlflow-run"]  # the flow run points back at the MLflow run
    assert pointer and run.info.run_id in str(pointer[0].data)


def test_scheduled_evaluation_logs_into_the_named_run(smoke_run, workdir, prefect_api_url, monkeypatch):
    from flows.evaluate import evaluate_run_flow
    from resrl.config import run_name

    cfg = smoke_run["cfg"]
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    result = evaluate_run_flow(run_name=run_name(cfg), config_file=str(ROOT / "conf" / "smoke.yaml"),
                               overrides=smoke_overrides(workdir))
    client = client_for(cfg)
    run = client.get_run(smoke_run["state"]["mlflow_run_id"])
    assert result["run_id"] == run.info.run_id and result["step"] == cfg.trainer.steps
    # same policy, same fixed evaluation seed: the scheduled numbers equal the run's final ones
    for key in ("avg_at_4", "pass_at_1", "pass_at_4"):
        assert run.data.metrics[f"eval_scheduled/{key}"] == pytest.approx(run.data.metrics[f"eval/{key}"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, f"eval_scheduled/step_{cfg.trainer.steps:05d}")}
    assert f"eval_scheduled/step_{cfg.trainer.steps:05d}/samples.json" in files


def test_rerunning_a_finished_run_does_not_train_again(smoke_run, workdir, prefect_api_url):
    cfg = smoke_run["cfg"]
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.run.experiment)
    before = len(client.search_runs([exp.experiment_id]))
    proc = run_cli(["train", "--config", "conf/smoke.yaml", *smoke_overrides(workdir)],
                   {"PREFECT_API_URL": prefect_api_url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" in proc.stdout
    assert len(client.search_runs([exp.experiment_id])) == before


def test_resume_after_kill_continues_the_same_run(workdir, prefect_api_url, smoke_prepared, tmp_path):
    from resrl.config import load_config, run_dir

    store = f"sqlite:///{tmp_path / 'other.db'}"
    overrides = [*smoke_overrides(workdir), "trainer.steps=6", "eval.every=3", "run.name=resume-test"]
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url, MLFLOW_TRACKING_URI=store)
    cfg = load_config(ROOT / "conf" / "smoke.yaml", overrides)
    state_file = run_dir(cfg) / "state.json"
    cmd = [sys.executable, "-m", "resrl.cli", "train", "--config", "conf/smoke.yaml", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if state_file.is_file() and json.loads(state_file.read_text())["step"] >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = json.loads(state_file.read_text())
    assert 2 <= killed["step"] < 6 and not killed["finished"]

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from step {killed['step']}" in done.stderr + done.stdout
    final = json.loads(state_file.read_text())
    assert final["finished"] and final["mlflow_run_id"] == killed["mlflow_run_id"]
    client = MlflowClient(tracking_uri=store)  # MLFLOW_TRACKING_URI was honoured
    history = client.get_metric_history(final["mlflow_run_id"], "train/reward_mean")
    assert sorted(m.step for m in history) == list(range(1, 7))  # every step once: none lost, none twice
    evals = client.get_metric_history(final["mlflow_run_id"], "eval/pass_at_1")
    assert sorted(m.step for m in evals) == [0, 3, 6]
    assert len(client.get_metric_history(final["mlflow_run_id"], "data/train_rows")) == 1  # not again on resume
    assert client.get_run(final["mlflow_run_id"]).info.status == "FINISHED"
