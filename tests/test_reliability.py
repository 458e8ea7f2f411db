"""Nothing lost, nothing silent: each failure as a user meets it.

Most checks run `resrl.cli.main` in this process (they fail before anything heavy);
subprocesses only where a second process, a signal or a real engine is the point.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from resrl.cli import main

SMOKE = str(ROOT / "conf" / "smoke.yaml")


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the CLI in this process; its exit code and its stderr lines (progress bars left out:
    building the embedded model on first use draws one)."""
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
                  if line.strip() and "%|" not in line]


def tiny_run(workdir: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long smoke run: untrained embedded model (no warm-start), few prompts."""
    return [f"run.cache_dir={workdir / 'cache'}", f"run.output_dir={out}", "warmstart.enabled=false",
            "trainer.steps=1", "data.synthetic.num_train=64", "data.synthetic.num_test=16", "eval.num_prompts=8",
            "rollout.prompts_per_step=4", "trainer.micro_batch_size=16", *extra]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().split(")")[-1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


# ----------------------------------------------------------------------------- 3. failing rewards

def test_reward_errors_over_the_limit_fail_and_under_it_are_counted():
    from resrl.evaluation import RewardError, score_samples

    rows = [{"data_source": "x", "answer": "1", "extra_info": None}] * 2
    outputs = [[([1], "a"), ([1], "b")]] * 2

    def broken(data_source, text, truth, extra=None):
        raise TypeError("boom")

    def half(data_source, text, truth, extra=None):
        if text == "a":
            raise TypeError("boom")
        return 1.0

    with pytest.raises(RewardError, match=r"failed on 4 of 4 samples.*reward.max_error_fraction=0.5.*boom"):
        score_samples(broken, rows, outputs, 0.5)
    assert score_samples(half, rows, outputs, 0.5) == ([0.0, 1.0, 0.0, 1.0], 2)


def test_a_reward_function_that_always_fails_fails_the_run(workdir, prefect_api_url, tmp_path):
    args = tiny_run(workdir, tmp_path, "reward.function=os:system")
    proc = run_cli(["train", "--config", "conf/smoke.yaml", *args], {"PREFECT_API_URL": prefect_api_url})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("resrl: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "reward.max_error_fraction" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr  # the one line, not Prefect's tracebacks
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resrl").experiment_id])
    assert run.info.status == "FAILED" and "RewardError" in run.data.tags["resrl.error"]


# ----------------------------------------------------------------------------- 1. one owner per run folder

def test_a_second_start_of_a_run_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(
        workdir, prefect_api_url, tmp_path, capsys):
    import socket

    from resrl.config import load_config, run_dir
    from resrl.run_state import RunFolderBusy, run_lock

    args = tiny_run(workdir, tmp_path)
    rdir = run_dir(load_config(SMOKE, args))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resrl.run_state import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
                               str(rdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        code, err = cli(capsys, "train", "--config", SMOKE, *args)
        errors = [line for line in err if line.startswith("resrl: error:")]
        assert code == 2 and time.time() - t0 < 60 and not any("Traceback" in line for line in err)
        assert len(errors) == 1 and errors[0].startswith("resrl: error: run folder")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in errors[0]
    finally:
        holder.kill()  # kill -9: the OS drops its flock
        holder.wait()
    with run_lock(rdir):  # taken over at once
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            with run_lock(rdir):
                pass


# ----------------------------------------------------------------------------- 2. parallel starts, new store

@pytest.mark.slow  # four processes that import MLflow: 15-25 s
def test_parallel_starts_on_a_new_sqlite_store_all_succeed(tmp_path):
    code = ("import sys; from resrl.config import load_config; from tasks.tracking import start_run\n"
            "print(start_run(load_config(None, [f'run.output_dir={sys.argv[1]}']).run, 'p', {}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resrl")
    assert len(client.search_runs([exp.experiment_id])) == 4
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # 9: the UI's experiment kind


# ----------------------------------------------------------------------------- 5. unreachable tracking server

def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:59999")
    t0 = time.time()
    code, err = cli(capsys, "train", "--config", SMOKE, f"run.output_dir={tmp_path}")
    assert time.time() - t0 < 15
    assert code == 2 and len(err) == 1 and "http://127.0.0.1:59999" in err[0] and "not reachable" in err[0]
    assert not any(tmp_path.iterdir())  # before the run folder, let alone data preparation


# ----------------------------------------------------------------------------- 4. edited data files

def test_an_edited_data_file_is_prepared_again(workdir, tmp_path):
    from resrl.config import load_config
    from resrl.data import load_prepared
    from resrl.prepare import prepare_base_and_data

    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    cfg = load_config(None, [f"run.cache_dir={workdir / 'cache'}", "data.source=gsm8k", f"data.path={data}",
                             "data.num_test=5", "data.max_prompt_tokens=2048", "warmstart.enabled=false"])
    first = prepare_base_and_data(cfg)
    assert prepare_base_and_data(cfg)["data_key"] == first["data_key"]  # unchanged: reused
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    second = prepare_base_and_data(cfg)
    assert second["data_key"] != first["data_key"] and not second["data_reused"]
    assert len(load_prepared(second["dataset_dir"])["train"]) == 25


# ----------------------------------------------------------------------------- 8. one line per user error

def test_every_null_default_has_a_declared_type():
    from resrl.config import DEFAULT_CONFIG, flatten, key_tags

    nulls = {k for k, v in flatten(OmegaConf.load(DEFAULT_CONFIG)).items() if v is None}
    typed = {k for k, tag in key_tags().items() if tag.type is not None}
    assert nulls <= typed and "run.name" in nulls


@pytest.mark.parametrize("overrides, needle", [
    (["data.num_train=abc"], "data.num_train"),
    (["model.path=5"], "model.path"),
    (["run.name=${oops}"], "oops"),
    (["reward.function=nope_mod:f"], "nope_mod"),
    (["rollout.max_tokens=300"], "positions"),
    (["data.synthetic.max_operand=1"], "distinct problems"),
])
def test_config_mistakes_are_one_line_before_anything_starts(overrides, needle, tmp_path, capsys):
    code, err = cli(capsys, "train", "--config", SMOKE, f"run.output_dir={tmp_path}", *overrides)
    assert code == 2 and len(err) == 1 and err[0].startswith("resrl: error:") and needle in err[0], err
    assert not any(tmp_path.iterdir())


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1\n")
    code, err = cli(capsys, "train", "--config", str(bad))
    assert code == 2 and len(err) == 1 and "bad.yaml" in err[0] and "cannot be read" in err[0]
    code, err = cli(capsys, "train", "--config", str(tmp_path))
    assert code == 2 and len(err) == 1 and "is a folder" in err[0]


def test_export_verl_takes_overrides_after_config(tmp_path, capsys):
    code, err = cli(capsys, "export-verl", str(tmp_path / "out"), "--config", SMOKE, "data.num_train=abc")
    assert code == 2 and "data.num_train" in err[0]  # the override was read (not "unrecognized arguments")


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"{\"question\": \"\xff\xfe\x81\", \"answer\": \"#### 1\"}\n", "cannot be read"),  # not UTF-8
    (b"this is { not json\n", "cannot be read"),
    # a bad row among good ones is named with its real cause
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "bad \\ud800 here", "answer": "#### 2"}\n',
     r"line 2 holds a lone surrogate \ud800"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "bad \xed\xa0\x80 here", "answer": "#### 2"}\n',
     "line 2 is not UTF-8: byte 0xed at column 19"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": }\n', "line 2 is not valid JSON"),
])
def test_unreadable_data_files_are_one_line(content, needle, workdir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    code, err = cli(capsys, "export-verl", str(tmp_path / "out"), f"run.cache_dir={workdir / 'cache'}",
                    "data.source=gsm8k", f"data.path={data}", "data.num_test=1", "warmstart.enabled=false")
    errors = [line for line in err if line.startswith("resrl: error:")]  # (datasets draws progress lines first)
    assert code == 2 and len(errors) == 1 and needle in errors[0] and str(data) in errors[0], err


# ----------------------------------------------------------------------------- 6, 7. Ctrl-C, kill -9

def _start_train(tmp_path: Path, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """`resrl train` as from a terminal (own process group), with Prefect's temporary server;
    returns once its flow run holds the run folder."""
    from resrl.config import load_config, run_dir

    args = tiny_run(workdir, tmp_path, "trainer.steps=100000")  # still running when the test stops it
    state = run_dir(load_config(SMOKE, args)) / "state.json"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "resrl.cli", "train", "--config", SMOKE, *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (state.is_file() and json.loads(state.read_text())["mlflow_run_id"]):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc, state


@pytest.mark.slow  # a real `resrl train` process with its Prefect server: 15-20 s each
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_exits_in_seconds_with_one_line_and_leaves_the_run_resumable(how, workdir, tmp_path):
    proc, state = _start_train(tmp_path, workdir)
    servers = _children(proc.pid)
    time.sleep(3)
    t0 = time.time()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, or torchrun stopping the ranks when one fails
    _, err = proc.communicate(timeout=120)
    took = time.time() - t0
    # 130, or -SIGINT: CPython ends by re-raising SIGINT on itself when the interrupt passed through
    # a C-level PyRun_* call on its way (a shell shows both as 130)
    assert proc.returncode in (130, -signal.SIGINT), err[-3000:]
    assert took < 30, f"took {took:.0f}s"
    assert any(line.startswith("resrl: interrupted;") and "run the same command again to resume" in line
               for line in err.splitlines()), err[-3000:]
    run_id = json.loads(state.read_text())["mlflow_run_id"]  # the run folder is kept
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"  # stopped, not broken, and not left RUNNING
    assert ("SIGTERM" in run.data.tags["resrl.error"]) == (how == "sigterm")
    assert servers and not any(_alive(pid) for pid in servers)  # the temporary Prefect server went with it


@pytest.mark.slow  # a CLI process: imports and a store, ~10 s
def test_a_temporary_prefect_server_that_does_not_start_is_one_line(workdir, tmp_path):
    """Eight runs starting together on 2 cores once took Prefect's temporary server past its
    20 s start limit (a RuntimeError traceback); the CLI now allows 180 s and says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"  # no time at all: it cannot start
    proc = subprocess.run([sys.executable, "-m", "resrl.cli", "train", "--config", SMOKE,
                           *tiny_run(workdir, tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("resrl: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now 0)" in errors[0]


def test_a_ctrl_c_that_a_destructor_swallows_is_raised_again_at_the_next_check(monkeypatch):
    """Python raises KeyboardInterrupt wherever the main thread is; inside a destructor or weakref
    callback it is reported as unraisable and dropped (seen in real runs, during garbage collection)."""
    from resrl import interrupts

    swallowed: list = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)
    old, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        class PressesCtrlC:
            def __del__(self):
                signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the destructor

        obj = PressesCtrlC()
        del obj  # the KeyboardInterrupt does not get past the destructor...
        assert [u.exc_type for u in swallowed] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):  # ...but the next check raises it
            interrupts.check()
        interrupts.reset()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):  # `kill PID`, or torchrun stopping a rank
            signal.raise_signal(signal.SIGTERM)
        assert interrupts.requested()
        interrupts.reset()
        with interrupts.deferred():  # while a stopping run is marked in MLflow: recorded, not raised
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):  # the raising handler is back after the block
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
        interrupts.reset()
    interrupts.check()  # nothing pending after a reset


@pytest.mark.slow  # a real `resrl train` process with its Prefect server: 10-20 s
def test_kill_9_leaves_no_prefect_server_behind(workdir, tmp_path):
    proc, _ = _start_train(tmp_path, workdir)
    servers = _children(proc.pid)
    assert servers
    proc.kill()
    proc.wait()
    deadline = time.time() + 15
    while any(_alive(pid) for pid in servers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in servers)


# ----------------------------------------------------------------------------- 9. noise

def test_harmless_vllm_warnings_are_dropped_and_real_ones_kept():
    import logging

    from resrl.rollout import quiet_vllm

    quiet_vllm()
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")  # at every weight sync: no weights
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == ["QKVParallelLinear: Failed to load weights"]
