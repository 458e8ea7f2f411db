"""Chaos check: many smoke-sized runs at once on one new MLflow store, random kill -9s,
resumes; then what was lost.

    python benchmarks/chaos.py [--runs 8] [--kills 6] [--seed 0] [--out DIR] [key=value ...]

Starts `--runs` training runs (the smoke config, one `seed` each, no warm-start unless
overridden) at the same moment against one new SQLite store, plus a second start of
two of them (which must refuse: one owner per run folder). While they run, kills a
random one with SIGKILL `--kills` times (the `resrl` process only, so its temporary
Prefect server must go by itself) and starts it again, which resumes it. At the end it
prints, per run and in total:

    finished         runs whose state.json says finished (and exit code 0)
    metrics missing  train/* steps or eval steps absent from the run's MLflow run
    logged twice     train steps with two entries (redone after a kill between logging and commit)
    duplicate runs   run folders with more than one MLflow run
    orphaned         Prefect servers / resrl processes still alive after their parent

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="working folder (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base = Path(a.out or tempfile.mkdtemp(prefix="resrl-chaos-"))
    common = [f"run.output_dir={base}/outputs", f"run.cache_dir={base}/cache", "warmstart.enabled=false",
              "trainer.steps=4", "eval.every=2", *a.overrides]

    from resrl.config import load_config, run_dir

    configs = {i: [*common, f"seed={i}"] for i in range(a.runs)}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seen_children: set[int] = set()

    def start(i: int, tag: str) -> subprocess.Popen:
        log = open(logs / f"run{i}-{tag}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "resrl.cli", "train", "--config", "conf/smoke.yaml",
                                 *configs[i]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    t0 = time.time()
    running = {i: start(i, "0") for i in configs}
    second: dict[int, subprocess.Popen] = {}  # a second start of runs 0 and 1 while they train: must refuse

    def holds_folder(i: int) -> bool:
        state = run_dir(load_config(ROOT / "conf" / "smoke.yaml", configs[i])) / "state.json"
        return state.is_file() and bool(json.loads(state.read_text()).get("mlflow_run_id"))

    attempts = {i: 1 for i in configs}
    exit_codes: dict[int, list[int]] = {i: [] for i in configs}
    kills = 0
    next_kill = time.time() + rng.uniform(20, 60)
    while running:
        time.sleep(1)
        for p in running.values():
            seen_children.update(children(p.pid))
        for i in list(configs)[:2]:
            if i not in second and i in running and holds_folder(i):
                second[i] = start(i, "second")
        # not killed while its second start is pending (the second one would take the folder over)
        victims = sorted(i for i in running if i not in second or second[i].poll() is not None)
        if kills < a.kills and time.time() >= next_kill and victims:
            i = rng.choice(victims)
            running[i].kill()  # the resrl process only: its Prefect server must follow by itself
            running[i].wait()
            exit_codes[i].append(-9)
            kills += 1
            print(f"{time.time() - t0:6.0f}s  kill -9 run {i} (attempt {attempts[i]}); starting it again", flush=True)
            attempts[i] += 1
            running[i] = start(i, str(attempts[i]))
            next_kill = time.time() + rng.uniform(20, 60)
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
        state = json.loads((rdir / "state.json").read_text()) if (rdir / "state.json").is_file() else {}
        ok = bool(state.get("finished")) and exit_codes[i][-1:] == [0]
        finished += ok
        mine = [r for r in all_runs if r.data.tags.get("resrl.run_dir") == str(rdir.resolve())]
        duplicates += len(mine) > 1
        lost = []
        if state.get("mlflow_run_id"):
            run_id = state["mlflow_run_id"]
            history = client.get_metric_history(run_id, "train/reward_mean")
            steps = {m.step for m in history}
            twice += len(history) - len(steps)  # a step redone after a kill between its logging and its commit
            lost += [f"train step {s}" for s in range(1, cfg.trainer.steps + 1) if s not in steps]
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
    print(f"\n{time.time() - t0:.0f}s | finished {finished}/{a.runs} | metrics missing {missing} | "
          f"duplicate runs {duplicates} | train steps logged twice {twice} | orphaned processes {len(orphans)} | kills {kills} | "
          f"second starts refused {sum(c == 2 for c in refused.values())}/{len(refused)} | logs {logs}")
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)  # ours (children of the runs this script started); not left running
    return 0 if finished == a.runs and not (missing or duplicates or orphans) and refused_ok else 1


if __name__ == "__main__":
    sys.exit(main())
