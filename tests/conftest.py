"""Shared, expensive fixtures: built once per test session.

- `prefect_api_url`: one Prefect test server for the whole session;
- `micro_model`: a very small untrained Qwen2 folder (unit tests of the trainer);
- `smoke_cfg` / `smoke_prepared`: the smoke config with a session cache (dataset and
  warm-start are built once and reused by every test and subprocess);
- `session`: one live TrainingSession (vLLM + DeepSpeed) on the smoke policy;
- `smoke_run`: the smoke flow run once through the `resrl` CLI, reporting to the
  shared Prefect server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resrl.environment import set_process_defaults

ROOT = Path(__file__).resolve().parent.parent
set_process_defaults()  # the same environment as the CLI's


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resrl")


@pytest.fixture(scope="session")
def prefect_api_url():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def micro_model(workdir) -> Path:
    from omegaconf import OmegaConf

    from resrl.embedded import save_embedded_base

    tiny = OmegaConf.create(dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                 num_kv_heads=2, max_positions=128))
    return save_embedded_base(workdir / "micro-model", tiny, seed=0)


def smoke_overrides(workdir: Path) -> list[str]:
    return [f"run.cache_dir={workdir / 'cache'}", f"run.output_dir={workdir / 'outputs'}"]


@pytest.fixture(scope="session")
def smoke_cfg(workdir):
    from resrl.config import load_config

    return load_config(ROOT / "conf" / "smoke.yaml", smoke_overrides(workdir))


@pytest.fixture(scope="session")
def smoke_prepared(smoke_cfg) -> dict:
    from resrl.prepare import prepare

    return prepare(smoke_cfg, progress=False)


@pytest.fixture(scope="session")
def session(smoke_cfg, smoke_prepared):
    from resrl.session import TrainingSession

    s = TrainingSession(smoke_cfg, smoke_prepared, smoke_prepared["policy_dir"], None)
    yield s
    s.close()


def run_cli(args: list[str], env_extra: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "resrl.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(workdir, prefect_api_url, smoke_prepared):
    """The whole smoke flow, as a user runs it, against the shared Prefect server."""
    proc = run_cli(["train", "--config", "conf/smoke.yaml", *smoke_overrides(workdir)],
                   {"PREFECT_API_URL": prefect_api_url})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from resrl.config import load_config, run_dir

    cfg = load_config(ROOT / "conf" / "smoke.yaml", smoke_overrides(workdir))
    state = json.loads((run_dir(cfg) / "state.json").read_text())
    return {"proc": proc, "cfg": cfg, "state": state, "run_dir": run_dir(cfg)}


# Fixtures that start engines, flows or servers. A test that uses one, directly or through
# another fixture, is marked `slow` here; a test that starts such processes itself carries
# @pytest.mark.slow. `pytest -m "not slow"` (`make test-fast`) is the quick subset to run
# while editing, under a minute on 2 cores (the default `pytest`, and CI, run everything).
HEAVY_FIXTURES = {"session", "smoke_prepared", "smoke_run", "sweep_run", "learner", "prefect_api_url"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
