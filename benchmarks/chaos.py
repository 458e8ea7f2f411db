"""Chaos check: many smoke-sized runs at once on one new MLflow store, with faults; then what
was lost.

    python benchmarks/chaos.py [--runs 8] [--faults 8] [--seed 0] [--out DIR] [key=value ...]

Starts `--runs` training runs (the smoke config, one `seed` each, no warm-start unless
overridden) at the same moment against one new SQLite store, plus a second start of
two of them (which must refuse: one owner per run folder), plus one run whose reward
function returns NaN once (`reward.function=benchmarks.faults:nan_reward`: it must fail,
FAILED in MLflow, exit code 2). While they run, `--faults` times it picks a running run and
one of these faults, then starts the run again, which must resume it:

    kill -9            the `resrl` process only (its temporary Prefect server must go by itself)
    corrupt checkpoint kill -9, then the newest committed checkpoint's weights are truncated:
                       the resume must fall back to the previous checkpoint
    delete state.json  kill -9, then state.json is deleted: the run must be recovered (same
                       MLflow run, no step trained or logged twice)
    damage state.json  kill -9, then state.json holds garbage: the restart must refuse with one
                       line naming it (exit 2); the file is then deleted and the run restarted
    SIGTERM            `kill PID`: the run must end non-zero (KILLED in MLflow)

and one run gets a SIGTERM 0-1 s after its final "eval step" line. At the end it prints,
per run and in total:

    finished         runs whose state.json says finished (and last exit code 0)
    metrics missing  train/* steps or eval steps absent from the run's MLflow run
    logged twice     train steps with two entries
    duplicate runs   run folders with more than one MLflow run
    orphaned         Prefect servers / resrl processes still alive after their parent
    silent successes a run that got SIGTERM (while alive) and exited 0, or the NaN run exiting 0

Long: on 2 cores, 8 runs take tens of minutes. Exit code 0 when nothing was lost.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


FAULTS = ("kill -9", "corrupt checkpoint", "delete state.json", "damage state.json", "SIGTERM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--faults", "--kills", type=int, default=8, help="faults injected (each picks one of FAULTS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="working folder (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base = Path(a.out or tempfile.mkdtemp(prefix="resrl-chaos-"))
    common = [f"run.output_dir={base}/outputs", f"run.cache_dir={base}/cache", "warmstart.enabled=false",
              "trainer.steps=4", "eval.every=2", *a.overrides]

    from resrl.checkpoint import checkpoint_dir, policy_dir
    from resrl.config import load_config, run_dir

    configs = {i: [*common, f"seed={i}"] for i in range(a.runs)}
    nan_run = a.runs  # one more run, whose reward returns NaN on its 40th call (in step 1's rollouts)
    configs[nan_run] = [*common, f"seed={nan_run}", "reward.function=benchmarks.faults:nan_reward"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seen_children: set[int] = set()

    def rdir_of(i: int) -> Path:
        return run_dir(load_config(ROOT / "conf" / "smoke.yaml", configs[i]))

    def start(i: int, tag: str) -> subprocess.Popen:
        log = open(logs / f"run{i}-{tag}.log", "w")
        extra = {"RESRL_NAN_REWARD_AT": "40"} if i == nan_run else {}
        return subprocess.Popen([sys.executable, "-m", "resrl.cli", "train", "--config", "conf/smoke.yaml",
                                 *configs[i]], cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    t0 = time.time()
    running = {i: start(i, "0") for i in configs}
    second: dict[int, subprocess.Popen] = {}  # a second start of runs 0 and 1 while they train: must refuse

    def state_of(i: int) -> dict:
        path = rdir_of(i) / "state.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}

    def holds_folder(i: int) -> bool:
        return bool(state_of(i).get("mlflow_run_id"))

    attempts = {i: 1 for i in configs}
    exit_codes: dict[int, list[int]] = {i: [] for i in configs}
    injected: list[str] = []
    silent = 0            # a SIGTERM to a live run that ended with exit code 0, or the NaN run exiting 0
    state_refusals = []   # exit codes of restarts onto a damaged state.json (must be 2, one line naming it)
    end_sigterm_run = rng.randrange(a.runs)  # this one gets a SIGTERM just after its final evaluation
    end_sigterm_at = None
    steps = load_config(ROOT / "conf" / "smoke.yaml", configs[0]).trainer.steps
    faults = 0
    next_fault = time.time() + rng.uniform(20, 60)

    def restart(i: int) -> None:
        tag = str(attempts[i])
        attempts[i] += 1
        running[i] = start(i, tag)

    def sigterm(i: int, why: str) -> None:
        nonlocal silent
        p = running[i]
        if p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        code = p.wait()
        exit_codes[i].append(code)
        if code == 0:
            silent += 1
        print(f"{time.time() - t0:6.0f}s  SIGTERM run {i} ({why}): exit {code}; starting it again", flush=True)
        restart(i)  # it resumes, or (finished as the signal came) says so and exits 0

    while running:
        time.sleep(0.2)
        for p in running.values():
            seen_children.update(children(p.pid))
        for i in list(configs)[:2]:
            if i not in second and i in running and holds_folder(i):
                second[i] = start(i, "second")
        # the final-evaluation SIGTERM
        i = end_sigterm_run
        if i in running and end_sigterm_at is None:
            try:
                text = (logs / f"run{i}-{attempts[i] - 1}.log").read_text(errors="replace")
            except OSError:
                text = ""
            if f"eval step {steps}:" in text:
                end_sigterm_at = time.time() + rng.uniform(0.0, 1.0)
        if end_sigterm_at is not None and end_sigterm_at > 0 and time.time() >= end_sigterm_at and i in running:
            end_sigterm_at = -1.0
            injected.append("SIGTERM after the final evaluation")
            sigterm(i, "after its final evaluation")
        # the random faults (not while a second start is pending: it would take the folder over)
        victims = sorted(i for i in running if i != nan_run and (i not in second or second[i].poll() is not None))
        if faults < a.faults and time.time() >= next_fault and victims:
            i = rng.choice(victims)
            fault = rng.choice(FAULTS)
            faults += 1
            next_fault = time.time() + rng.uniform(20, 60)
            if fault == "SIGTERM":
                injected.append(fault)
                sigterm(i, "random moment")
                continue
            running[i].kill()  # the resrl process only: its Prefect server must follow by itself
            running[i].wait()
            exit_codes[i].append(-9)
            rdir, state = rdir_of(i), state_of(i)
            if fault == "corrupt checkpoint":
                model = policy_dir(checkpoint_dir(rdir, state.get("step", 0))) / "model.safetensors"
                if state.get("step", 0) > 0 and model.is_file():
                    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
                else:
                    fault = "kill -9"  # no committed checkpoint yet
            elif fault == "delete state.json":
                (rdir / "state.json").unlink(missing_ok=True)
            elif fault == "damage state.json":
                (rdir / "state.json").write_text("{garbage")
                tag = f"{attempts[i]}-refused"
                p = start(i, tag)
                code = p.wait()
                state_refusals.append(code)
                text = (logs / f"run{i}-{tag}.log").read_text(errors="replace")
                ok = code == 2 and "state.json cannot be read" in text and "Traceback" not in text
                print(f"{time.time() - t0:6.0f}s  run {i} restarted on a damaged state.json: exit {code}"
                      f"{'' if ok else ' (NOT the one-line refusal)'}; deleting it", flush=True)
                (rdir / "state.json").unlink(missing_ok=True)
            injected.append(fault)
            print(f"{time.time() - t0:6.0f}s  {fault} run {i} (attempt {attempts[i]}); starting it again", flush=True)
            restart(i)
        for i, p in list(running.items()):
            if p.poll() is not None:
                exit_codes[i].append(p.returncode)
                print(f"{time.time() - t0:6.0f}s  run {i} exited {p.returncode}", flush=True)
                del running[i]
    refused = {i: p.wait() for i, p in second.items()}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'outputs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resrl")
    all_runs = client.search_runs([exp.experiment_id]) if exp else []
    finished = missing = duplicates = twice = 0
    for i, overrides in configs.items():
        cfg = load_config(ROOT / "conf" / "smoke.yaml", overrides)
        rdir = run_dir(cfg)
        state = state_of(i)
        mine = [r for r in all_runs if r.data.tags.get("resrl.run_dir") == str(rdir.resolve())]
        duplicates += len(mine) > 1
        if i == nan_run:
            status = mine[0].info.status if mine else "none"
            failed_right = exit_codes[i][-1:] == [2] and status == "FAILED" and "returned nan" in \
                (mine[0].data.tags.get("resrl.error", "") if mine else "")
            silent += exit_codes[i][-1:] == [0]
            print(f"run {i} (NaN reward): exits {exit_codes[i]}, MLflow {status}"
                  + ("" if failed_right else " -- NOT failed as it should"))
            continue
        ok = bool(state.get("finished")) and exit_codes[i][-1:] == [0]
        finished += ok
        lost = []
        if state.get("mlflow_run_id"):
            run_id = state["mlflow_run_id"]
            history = client.get_metric_history(run_id, "train/reward_mean")
            logged = {m.step for m in history}
            twice += len(history) - len(logged)
            lost += [f"train step {s}" for s in range(1, cfg.trainer.steps + 1) if s not in logged]
            evals = {m.step for m in client.get_metric_history(run_id, "eval/pass_at_1")}
            due = {0, cfg.trainer.steps} | set(range(cfg.eval.every, cfg.trainer.steps + 1, cfg.eval.every))
            lost += [f"eval step {s}" for s in sorted(due - evals)]
            if len(client.get_metric_history(run_id, "data/train_rows")) != 1:
                lost.append("data/* logged more or less than once")
        missing += bool(lost)
        print(f"run {i}: {'finished' if ok else 'NOT finished'}, attempts {attempts[i]}, exits {exit_codes[i]}, "
              f"MLflow runs {len(mine)}" + (f", missing: {', '.join(lost)}" if lost else ""))
    orphans = [pid for pid in seen_children if alive(pid)]
    refused_ok = all(code == 2 for code in refused.values())
    fallbacks = sum("is damaged" in f.read_text(errors="replace") for f in logs.glob("*.log"))
    recovered = sum("had no state.json: recovered" in f.read_text(errors="replace") for f in logs.glob("*.log"))
    print(f"\nfaults injected: {', '.join(injected) or 'none'}; checkpoint fallbacks seen {fallbacks}, state.json "
          f"recoveries {recovered}, damaged state.json refused in one line {sum(c == 2 for c in state_refusals)}/"
          f"{len(state_refusals)}")
    print(f"{time.time() - t0:.0f}s | finished {finished}/{a.runs} | metrics missing {missing} | "
          f"duplicate runs {duplicates} | train steps logged twice {twice} | orphaned processes {len(orphans)} | "
          f"silent successes {silent} | second starts refused {sum(c == 2 for c in refused.values())}/"
          f"{len(refused)} | logs {logs}")
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)  # ours (children of the runs this script started); not left running
    return 0 if (finished == a.runs and not (missing or duplicates or twice or orphans or silent) and refused_ok
                 and all(c == 2 for c in state_refusals)) else 1


if __name__ == "__main__":
    sys.exit(main())
