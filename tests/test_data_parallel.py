"""Data-parallel ranks (trainer.num_processes), two CPU ranks over gloo started by torchrun:
the update on 2 ranks equals the one on 1 rank (ZeRO 0 and 3), every rank's vLLM engine gives
the same log-probs after a weight sync, the ranks sample disjoint whole prompt groups that cover
the step's batch exactly once; plus the checks that refuse bad set-ups before any model loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resrl import ranks
from resrl.config import ConfigError, load_config, to_dict
from resrl.environment import free_port

ROOT = Path(__file__).resolve().parent.parent
RANKS = ROOT / "tests" / "dp_ranks.py"


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(RANKS), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ------------------------------------------------------------------ no ranks needed
def test_group_shares_are_disjoint_contiguous_and_cover_every_group_once():
    for groups in range(1, 11):
        for size in range(1, groups + 1):
            shares = [ranks.group_share(groups, r, size) for r in range(size)]
            flat = [g for s in shares for g in s]
            assert flat == list(range(groups))  # each group once, in prompt order
            assert all(len(s) >= 1 for s in shares)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_more_ranks_than_prompt_groups_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.num_processes \(5\) is more than rollout.prompts_per_step \(4\)"):
        load_config(None, ["rollout.prompts_per_step=4", "trainer.num_processes=5"])
    with pytest.raises(ConfigError, match="num_processes must be an integer >= 1"):
        load_config(None, ["trainer.num_processes=0"])


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match="float16 cannot train on the CPU"):
        load_config(None, ["model.dtype=float16", "trainer.device=cpu"])


def test_launcher_world_must_match_the_config(monkeypatch):
    cfg = load_config(None, ["trainer.num_processes=2"])
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ranks.LaunchError, match="needs a launcher"):
        ranks.check_launch(cfg.trainer)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ranks.LaunchError, match="launcher started 3 process"):
        ranks.check_launch(cfg.trainer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks.check_launch(cfg.trainer)


# ------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    """A tiny Qwen2 that vLLM's CPU attention takes (head_dim 64)."""
    from omegaconf import OmegaConf

    from resrl.embedded import save_embedded_base

    tiny = OmegaConf.create(dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                                 num_kv_heads=1, max_positions=128))
    return save_embedded_base(tmp_path_factory.mktemp("dp") / "model", tiny, seed=0)


CASES = {  # ZeRO stage, overrides: 6 groups split 3/3; 5 groups split 3/2 with PSR's uneven
    0: [],  # training rows and 1-row micro-batches (the padding passes of the shorter rank)
    3: ["rollout.prompts_per_step=5", "algorithm.name=psr", "trainer.micro_batch_size=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("zero", sorted(CASES))
def test_update_on_two_ranks_equals_one_rank(zero, vllm_model, tmp_path):
    out = {}
    for nproc in (1, 2):
        torchrun(nproc, "update", str(vllm_model), str(tmp_path / f"w{nproc}"), str(zero), *CASES[zero])
        d = tmp_path / f"w{nproc}"
        out[nproc] = {"weights": torch.load(d / "weights.pt"), "metrics": json.loads((d / "metrics.json").read_text()),
                      "logprobs": json.loads((d / "logprobs.json").read_text())}
    one, two = out[1], out[2]
    moved = max(float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"])
    # lr 1e-3: Adam moves every weight by ~1e-3 per step; the ranks' sums differ only in float order
    assert moved < 1e-5, moved
    for key in ("loss", "grad_norm", "pg_loss", "approx_kl", "entropy", "lld", "update_samples"):
        assert one["metrics"][key] == pytest.approx(two["metrics"][key], rel=1e-5, abs=1e-7), key
    # after the sync every rank's engine scores the fixed sequence alike, and like one rank's engine
    lp = [torch.tensor(x) for x in two["logprobs"]]
    assert len(lp) == 2 and torch.equal(lp[0], lp[1])
    torch.testing.assert_close(lp[0], torch.tensor(one["logprobs"][0]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ranks_sample_disjoint_whole_groups_covering_the_step(smoke_cfg, smoke_prepared, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(smoke_cfg, {"trainer": {"num_processes": 2}, "run": {"output_dir": str(tmp_path / "o")}})
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    (tmp_path / "prepared.json").write_text(json.dumps(smoke_prepared, default=str))
    torchrun(2, "session", str(tmp_path / "cfg.json"), str(tmp_path / "prepared.json"), str(tmp_path / "s"))
    got = json.loads((tmp_path / "s" / "session.json").read_text())
    asked = [json.loads((tmp_path / "s" / f"rank{r}_prompts.json").read_text()) for r in (0, 1)]
    step_prompts = got["train_prompts"]
    P = cfg.rollout.prompts_per_step
    assert len(asked[0]) == len(asked[1]) == P // 2
    assert asked[0] + asked[1] == step_prompts  # disjoint, in order, together the whole step once
    n = cfg.rollout.n
    assert got["batch_prompts"] == [p for p in step_prompts for _ in range(n)]  # whole groups of n samples
    assert got["batch_group_ids"] == [g for g in range(P) for _ in range(n)]
    m = got["metrics"]
    for key in ("train/reward_mean", "train/loss", "train/grad_norm", "time/update_s", "time/weight_sync_s"):
        assert key in m and m[key] == m[key], key
    assert (tmp_path / "s" / "checkpoint" / "policy" / "model.safetensors").exists()


# ------------------------------------------------------------------ the smoke flow on two ranks
def _descendants(pid: int) -> list[int]:
    kids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids.setdefault(int(stat.read_text().split(")")[-1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
        cmd = Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env and "resrl.cli" in cmd else None


@pytest.mark.slow
def test_smoke_flow_on_two_ranks_survives_a_killed_rank(workdir, smoke_prepared, prefect_api_url, tmp_path):
    """`resrl train trainer.num_processes=2`: kill -9 one rank mid-run, run the command again: it
    continues from the last committed step in the same MLflow run; every metric once per step."""
    import signal
    import time

    from conftest import smoke_overrides
    from test_flow import REQUIRED_STEP_METRICS

    from resrl.config import run_dir
    from tasks.tracking import client_for

    overrides = [*smoke_overrides(workdir), f"run.output_dir={tmp_path / 'out'}", "trainer.num_processes=2",
                 "trainer.steps=4", "eval.every=2", "eval.num_prompts=8"]
    cfg = load_config(ROOT / "conf" / "smoke.yaml", overrides)
    state_path = run_dir(cfg) / "state.json"
    cmd = [sys.executable, "-m", "resrl.cli", "train", "--config", "conf/smoke.yaml", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_api_url)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by in-process trainers
        env.pop(key, None)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not (state_path.is_file() and json.loads(state_path.read_text())["step"] >= 1):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-5000:]
            time.sleep(0.2)
        victims = [p for p in _descendants(proc.pid) if _rank_of(p) == 1]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        assert proc.wait(timeout=180) != 0  # torchrun stops the other rank and reports the failure
    assert not [p for p in _descendants(proc.pid) if _rank_of(p) is not None]
    committed = json.loads(state_path.read_text())["step"]
    assert 1 <= committed < 4
    stopped = client_for(cfg.run).get_run(json.loads(state_path.read_text())["mlflow_run_id"]).info.status
    assert stopped in ("FAILED", "KILLED")  # rank 0 marked it (torchrun's SIGTERM did not cut that off)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert f"from step {committed}" in again.stdout + again.stderr
    state = json.loads(state_path.read_text())
    assert state["finished"] and state["step"] == 4
    client = client_for(cfg.run)
    runs = client.search_runs([client.get_experiment_by_name(cfg.run.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]  # one MLflow run, logged by rank 0
    run_id = state["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in REQUIRED_STEP_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, 5)), key
    for step in (0, 2, 4):
        assert [m.step for m in client.get_metric_history(run_id, "eval/pass_at_1")].count(step) == 1
