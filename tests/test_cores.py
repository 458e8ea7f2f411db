"""Each sweep lane and data-parallel CPU rank gets its own share of the cores (resrl/cores.py):
the pure share computation, and the settings a child process actually ends up with."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resrl import cores

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n_cores, count, want", [
    (2, 1, [(0, 1)]),
    (2, 2, [(0,), (1,)]),
    (8, 2, [(0, 1, 2, 3), (4, 5, 6, 7)]),
    (8, 3, [(0, 1, 2), (3, 4, 5), (6, 7)]),   # the remainder goes to the first lanes
    (2, 3, [(0,), (1,), (0,)]),               # more lanes than cores: one core each, shared
])
def test_shares_are_disjoint_blocks_of_cores_div_lanes(n_cores, count, want):
    shares = [cores.core_share(i, count, list(range(n_cores))) for i in range(count)]
    assert [s.cores for s in shares] == want
    assert [s.threads for s in shares] == [len(c) for c in want]
    if count <= n_cores:
        assert len(set().union(*[set(s.cores) for s in shares])) == sum(len(s.cores) for s in shares)


def test_share_respects_the_users_thread_cap_and_the_cores_it_is_given():
    assert cores.core_share(0, 2, list(range(8)), cap=1) == cores.CoreShare((0, 1, 2, 3), 1)
    assert cores.core_share(1, 2, [4, 5, 9, 11]).cores == (9, 11)  # e.g. under taskset -c 4,5,9,11
    with pytest.raises(ValueError):
        cores.core_share(2, 2, [0, 1])


def test_env_carries_threads_and_vllm_core_list():
    env = cores.CoreShare((0, 1, 2, 5), 4).env()
    assert env == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-2,5",
                   "RESRL_CORES": "0-2,5"}
    assert cores.parse_id_list("0-2,5") == (0, 1, 2, 5)


def test_sweep_lane_env_is_the_lanes_share(monkeypatch):
    from flows.sweep import lane_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RESRL_PIN_CORES", raising=False)
    available = cores.available_cores()
    envs = [lane_env(i, 2) for i in range(2)]
    if len(available) >= 2:
        sets = [set(cores.parse_id_list(e["RESRL_CORES"])) for e in envs]
        assert not sets[0] & sets[1] and sets[0] | sets[1] == set(available)
        assert [int(e["OMP_NUM_THREADS"]) for e in envs] == [len(s) for s in sets]
    monkeypatch.setenv("RESRL_PIN_CORES", "0")
    assert lane_env(0, 2) == {}


CHILD = """
import json, os, torch
from resrl import cores
share = {how}
print(json.dumps({{"threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
                  "env": {{k: os.environ.get(k) for k in cores.THREAD_ENV}},
                  "share": None if share is None else list(share.cores)}}))
"""


def _child(how: str, env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RESRL_PIN_CORES", "RESRL_CORES",
                         "RESRL_THREAD_CAP")}
    out = subprocess.run([sys.executable, "-c", CHILD.format(how=how)], env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(cores.available_cores()) < 2,
                    reason="needs CPU affinity and 2 cores")
def test_a_sweep_lane_process_takes_the_share_it_is_handed(monkeypatch):
    from flows.sweep import lane_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    available = cores.available_cores()
    got = _child("cores.apply_from_env()", lane_env(1, 2))
    want = list(cores.core_share(1, 2, available).cores)
    assert got["share"] == want and got["affinity"] == want
    assert got["threads"] == len(want) < len(available)
    assert got["env"]["VLLM_CPU_OMP_THREADS_BIND"] == cores.id_list(want)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(cores.available_cores()) < 2,
                    reason="needs CPU affinity and 2 cores")
def test_data_parallel_ranks_take_disjoint_shares(monkeypatch):
    """What torchrun hands each rank (LOCAL_RANK / LOCAL_WORLD_SIZE, and resrl's launcher_env)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch = cores.launcher_env(2)
    assert int(launch["OMP_NUM_THREADS"]) == len(cores.available_cores()) // 2
    got = [_child("cores.local_rank_share(); cores.apply_share(share)",
                  {**launch, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}) for r in (0, 1)]
    assert not set(got[0]["affinity"]) & set(got[1]["affinity"])
    assert [g["threads"] for g in got] == [len(g["affinity"]) for g in got]
    assert got[0]["env"]["OMP_NUM_THREADS"] == str(got[0]["threads"])
    capped = _child("cores.local_rank_share(); cores.apply_share(share)",
                    {"OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert capped["threads"] == 1  # the user's OMP_NUM_THREADS caps a rank's threads
    single = _child("cores.local_rank_share()", {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    assert single["share"] is None and single["affinity"] == cores.available_cores()  # one rank: left alone
