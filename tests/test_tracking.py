"""What a run gives MLflow beyond params and metrics, on one SQLite store for the module (its
schema migration takes ~10 s on 2 cores, so these are in the slow set): per-step metrics logged
in the background and all stored after a flush, system metrics, the prepared data as dataset
inputs, the final policy as a model that loads offline, and its registration with an alias."""
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from resrl.config import load_config
    from tasks import tracking

    out = tmp_path_factory.mktemp("tracking")
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [f"run.output_dir={out}", f"run.tracking_uri=sqlite:///{out}/m.db"])
    tracking.ensure_experiment(cfg.run)
    return cfg, MlflowClient(tracking_uri=tracking.tracking_uri(cfg.run))


def _new_run(cfg, name):
    from tasks import tracking

    return tracking.start_run(cfg.run, name, tags={})


def test_step_metrics_logged_in_the_background_are_all_stored_after_a_flush(store):
    from tasks import tracking

    cfg, client = store
    run_id = _new_run(cfg, "async")
    entries = [(step, {"train/reward_mean": step / 100, "train/loss": -step, "time/update_s": 0.5})
               for step in range(1, 101)]
    for step, metrics in entries:  # one call per committed step, as the training flow makes them
        tracking.log_step_metrics(cfg.run, run_id, [(step, metrics)], synchronous=False)
    tracking.flush()
    assert not tracking._PENDING
    for key in ("train/reward_mean", "train/loss", "time/update_s"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, 101)), key
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}[37] == -37


def test_system_metrics_are_logged_while_the_run_trains_and_can_be_turned_off(store, monkeypatch):
    from omegaconf import OmegaConf

    from tasks import tracking

    cfg, client = store
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    run_id = _new_run(cfg, "system")
    monitor = tracking.start_system_metrics(cfg.run, run_id)
    time.sleep(2.5)
    tracking.stop_system_metrics(monitor)
    tracking.stop_system_metrics(monitor)  # a second stop is a no-op
    metrics = client.get_run(run_id).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/system_memory_usage_percentage", "system/disk_usage_percentage"):
        assert key in metrics, sorted(metrics)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(steps)
    # a resumed run continues the steps instead of writing over them
    monitor = tracking.start_system_metrics(cfg.run, run_id)
    time.sleep(1.2)
    tracking.stop_system_metrics(monitor)
    again = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(again) > len(steps) and min(again[len(steps):]) > max(steps)
    off = OmegaConf.merge(cfg, {"run": {"system_metrics": False}})
    assert tracking.start_system_metrics(off.run, run_id) is None


def test_the_prepared_data_is_the_runs_dataset_input(store, tmp_path):
    import json

    from datasets import Dataset, DatasetDict

    from tasks import tracking

    cfg, client = store
    data = tmp_path / "data" / "0123abcd"
    rows = {"train": [f"Q: {i}+1=?\nA:" for i in range(30)], "test": [f"Q: {i}+2=?\nA:" for i in range(7)]}
    DatasetDict({split: Dataset.from_dict({"prompt": p, "prompt_token_ids": [[1, 2, i] for i in range(len(p))],
                                          "ground_truth": ["1"] * len(p)}) for split, p in rows.items()}
                ).save_to_disk(str(data))
    run_id = _new_run(cfg, "data")
    tracking.log_datasets(cfg, run_id, data)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"train", "test"}
    for split, ds in by_context.items():
        assert ds.name == "synthetic-0123abcd" and ds.digest
        assert json.loads(ds.profile)["num_rows"] == len(rows[split])
        assert str(data) in ds.source
        assert "prompt" in ds.schema
    assert by_context["train"].digest != by_context["test"].digest


def test_the_final_policy_is_a_model_that_loads_offline_and_registers_with_an_alias(store, micro_model, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc
    import torch
    from mlflow.entities import LoggedModelStatus
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import tracking

    cfg, client = store
    run_id = _new_run(cfg, "model")
    model_id = tracking.log_policy_model(cfg, run_id, micro_model, step=4)
    run = client.get_run(run_id)
    assert run.data.tags["resrl.model_id"] == model_id
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    # loaded as a user would, from the store alone (HF_HUB_OFFLINE=1 in the tests, as in the CLI)
    # (models:/ URIs resolve against the default tracking URI; mlflow.set_tracking_uri would export it to the session)
    local = mlflow.artifacts.download_artifacts(artifact_uri=client.get_logged_model(model_id).artifact_location,
                                                dst_path=str(tmp_path / "m"))
    policy = mlflow.pyfunc.load_model(local)
    prompts = ["Q: 1+2+3+4=?\nA:", "Q: 9+9+9+9=?\nA:"]
    got = policy.predict(prompts, params={"max_new_tokens": 6})
    tok = AutoTokenizer.from_pretrained(micro_model)
    hf = AutoModelForCausalLM.from_pretrained(micro_model)
    want = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        want.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert got == want and all(isinstance(g, str) for g in got)

    assert tracking.register_model(cfg.run, "resrl-test", run_id) == "1"
    assert tracking.register_model(cfg.run, "resrl-test", run_id) == "1"  # the alias points at it already: no new one
    best = client.get_model_version_by_alias("resrl-test", "best")
    assert str(best.version) == "1" and best.run_id == run_id
    assert best.source == client.get_logged_model(model_id).artifact_location
    assert tracking.register_model(cfg.run, "resrl-test", _new_run(cfg, "no model")) is None
