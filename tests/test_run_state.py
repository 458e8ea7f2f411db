"""Run-folder bookkeeping: the state file, and which checkpoints exist and survive pruning."""
import pytest

from resrl.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, policy_dir, prune_checkpoints, step_of
from resrl.errors import ConfigError
from resrl.run_state import RunState


def _make(rdir, *steps):
    for s in steps:
        policy_dir(checkpoint_dir(rdir, s)).mkdir(parents=True)


def _left(rdir):
    return [step_of(c) for c in list_checkpoints(rdir)]


def test_checkpoints_are_listed_by_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    _make(tmp_path, 100000, 9, 12)  # past 5 digits the names no longer sort as the steps do
    assert _left(tmp_path) == [9, 12, 100000]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 100000)
    assert step_of(checkpoint_dir(tmp_path, 7)) == 7


def test_pruning_keeps_the_newest_committed_checkpoints(tmp_path):
    _make(tmp_path, 2, 4, 6, 8)
    prune_checkpoints(tmp_path, keep=2, committed=8)
    assert _left(tmp_path) == [6, 8]


def test_a_stale_checkpoint_newer_than_the_commit_never_displaces_it(tmp_path):
    # An interrupted run wrote step 4 but never committed it; the resumed run redid
    # step 3 and committed that. Keeping "the newest" by name would delete step 3.
    _make(tmp_path, 2, 3, 4)
    prune_checkpoints(tmp_path, keep=1, committed=3)
    assert _left(tmp_path) == [3]


def test_state_round_trips_and_saves_atomically(tmp_path):
    state = RunState(config_hash="abc", step=3, mlflow_run_id="r1", evaluated=[0, 3])
    state.save(tmp_path)
    assert RunState.load(tmp_path) == state
    assert not list(tmp_path.glob("*.tmp"))
    assert RunState.load(tmp_path / "missing") is None


def test_state_open_refuses_another_config_and_a_started_run_without_resume(tmp_path):
    state = RunState.open(tmp_path, "abc", resume=False)
    assert state == RunState(config_hash="abc") and RunState.load(tmp_path) == state
    with pytest.raises(ConfigError, match="different config"):
        RunState.open(tmp_path, "xyz", resume=True)
    state.step = 2
    state.save(tmp_path)
    assert RunState.open(tmp_path, "abc", resume=True).step == 2
    with pytest.raises(ConfigError, match="run.resume=false"):
        RunState.open(tmp_path, "abc", resume=False)


def test_a_commits_metrics_reach_mlflow_once_even_if_logging_was_cut_short(tmp_path):
    """The flow writes a checkpoint's step metrics, commits, then logs them; a resume logs only
    the steps MLflow lacks (an interruption can fall between the commit and the logging)."""
    import math

    from mlflow.tracking import MlflowClient

    from resrl.checkpoint import load_step_metrics, save_step_metrics
    from resrl.config import load_config
    from tasks import tracking

    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    run_id = tracking.start_run(cfg.run, "once", {})
    ckpt = checkpoint_dir(tmp_path, 3)
    ckpt.mkdir(parents=True)
    entries = [(s, {"train/reward_mean": s / 10, "train/lld": float("nan")}) for s in (1, 2, 3)]
    save_step_metrics(ckpt, entries)
    assert [(s, m["train/reward_mean"]) for s, m in load_step_metrics(ckpt)] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert math.isnan(load_step_metrics(ckpt)[0][1]["train/lld"])
    tracking.log_step_metrics(cfg.run, run_id, entries[:1])  # the logging was cut short after step 1
    tracking.log_step_metrics(cfg.run, run_id, load_step_metrics(ckpt), only_missing=True)  # the resume
    history = MlflowClient(tracking.tracking_uri(cfg.run)).get_metric_history(run_id, "train/reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert load_step_metrics(checkpoint_dir(tmp_path, 9)) == []  # a checkpoint from before this file existed
