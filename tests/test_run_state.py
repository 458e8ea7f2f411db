"""Run-folder bookkeeping: which checkpoints survive pruning."""
from resrl.run_state import RunState, checkpoint_dir, prune_checkpoints


def _make(rdir, *steps):
    for s in steps:
        (checkpoint_dir(rdir, s) / "policy").mkdir(parents=True)


def _left(rdir):
    return sorted(int(p.name[5:]) for p in (rdir / "checkpoints").iterdir())


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
