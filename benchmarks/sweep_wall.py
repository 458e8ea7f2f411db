"""Wall time of one sweep, run four ways on this machine, one after another:

  lanes1  in lane processes here, concurrency 1 (one lane, every core)
  lanes2  concurrency 2 (two lanes, each on its own half of the cores: resrl/cores.py)
  pool1   on a Prefect work pool with one process worker (every core)
  pool2   on the pool with two workers, each started on its own half of the cores
          (infra/worker.sh with RESRL_WORKER_CORES) - two machines, played by one

    python benchmarks/sweep_wall.py [--sweep conf/sweep/smoke.yaml] [--modes lanes1 lanes2 pool1 pool2]

Each mode starts from a new cache and a new output folder, so each builds its data and its
warm-start once (the cache lock makes a second lane or worker wait for the first builder), as a
newcomer's first sweep does. The pool modes use a temporary Prefect server (its own
PREFECT_HOME, 127.0.0.1, a free port) with the train flow deployed on a process work pool; the
lane modes talk to the same server with no deployment named (run.sweep_deployment=null), so
every mode pays the same server costs. MLflow: each mode's own SQLite store under its output
folder (every process of a mode is on this machine).

Prints each mode's wall time (the `resrl sweep` command, start to exit), its points finished,
which worker took which points, and the ratios lanes2/lanes1 and pool2/pool1. On a machine
with C cores, two lanes or two workers each get C/2: on 2 cores that is one core each, so
no speed-up is expected there; the ratio shows what a second lane or worker costs (issue 18's
target: lanes2 <= 1.1 x lanes1). On two real machines each worker has all of its own cores.
Time it alone: another busy process on the same cores makes the figures meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from resrl.cores import available_cores, core_share, id_list  # noqa: E402

PY = sys.executable
POOL, DEPLOYMENT_NAME = "resrl-bench-pool", "bench"
DEPLOYMENT = f"resrl-train/{DEPLOYMENT_NAME}"
MODES = ("lanes1", "lanes2", "pool1", "pool2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env, timeout=600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return proc


class Server:
    """A temporary Prefect server with the train flow deployed on a process work pool."""

    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=self.url, RESRL_ROOT=str(ROOT),
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(home / "server.log", "w")
        self.proc = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def setup(self) -> None:
        """Wait for the server, then create the pool and deploy the train flow on it."""
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit(f"the Prefect server did not start: see {self.log.name}")
                time.sleep(1)
        prefect = [PY, "-m", "prefect"]
        run(prefect + ["work-pool", "create", POOL, "--type", "process"], self.env)
        run(prefect + ["--no-prompt", "deploy", "flows/train.py:train_flow", "-n", DEPLOYMENT_NAME, "-p", POOL],
            self.env)

    def workers(self, cores: list[str | None], logs: list[Path]) -> list[subprocess.Popen]:
        """Process workers (one flow run at a time each), worker i on cores[i] (None: all)."""
        procs = []
        for i, (c, log) in enumerate(zip(cores, logs)):
            env = dict(self.env, RESRL_WORK_POOL=POOL)
            env.pop("RESRL_WORKER_CORES", None)
            if c:
                env["RESRL_WORKER_CORES"] = c
            procs.append(subprocess.Popen(["bash", "infra/worker.sh", "--name", f"w{i}"], cwd=ROOT, env=env,
                                          stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_online(len(procs))
        return procs

    def _wait_online(self, n: int) -> None:
        """Until n workers of the pool are ONLINE (asked over the server's REST API: this process's
        Prefect client would read settings loaded before PREFECT_API_URL was known)."""
        req = urllib.request.Request(f"{self.url}/work_pools/{POOL}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        t0 = time.time()
        while True:
            with urllib.request.urlopen(req, timeout=30) as resp:
                workers = json.load(resp)
            if sum(str(w.get("status", "")).upper() == "ONLINE" for w in workers) >= n:
                return
            if time.time() - t0 > 300:
                raise SystemExit(f"the workers did not come online: {workers}")
            time.sleep(2)

    def stop_workers(self, procs) -> None:
        for p in procs:
            with_group(p, 15)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                with_group(p, 9)
                p.wait(30)
        # a stopped worker stays ONLINE on the server until its heartbeat lapses: the modes reuse the
        # names w0, w1 (pool1 before pool2), so the sweep never counts a worker that is gone

    def close(self) -> None:
        with_group(self.proc, 15)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with_group(self.proc, 9)


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def sweep_file(base_sweep: Path, work: Path, concurrency: int, deployment: str | None) -> Path:
    spec = yaml.safe_load(base_sweep.read_text())
    if spec.get("base"):
        spec["base"] = str((ROOT / spec["base"]).resolve())
    spec["overrides"] = list(spec.get("overrides") or []) + [
        f"run.cache_dir={work / 'cache'}", f"run.output_dir={work / 'out'}",
        f"run.sweep_deployment={deployment or 'null'}"]
    spec["concurrency"] = concurrency
    out = work / "sweep.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def run_mode(mode: str, base_sweep: Path, root: Path, server: Server) -> dict:
    work = root / mode
    work.mkdir()
    pool = mode.startswith("pool")
    count = int(mode[-1])
    spec = sweep_file(base_sweep, work, concurrency=1 if pool else count, deployment=DEPLOYMENT if pool else None)
    workers, logs = [], []
    if pool:  # worker i on its block of this machine's cores, as a sweep's lane i of `count` gets
        cores = [None] if count == 1 else [id_list(core_share(i, count, available_cores()).cores)
                                           for i in range(count)]
        logs = [work / f"worker{i}.log" for i in range(count)]
        workers = server.workers(cores, logs)
    print(f"[{mode}] resrl sweep ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-m", "resrl.cli", "sweep", "--config", str(spec)], cwd=ROOT, env=server.env,
                          stdout=open(work / "sweep.log", "w"), stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    server.stop_workers(workers)
    text = (work / "sweep.log").read_text()
    row = {"mode": mode, "wall_s": wall, "rc": proc.returncode, "finished": text.count("  finished "),
           # flow runs a worker finished (both workers may log "submitting" for one run; one gets it)
           "points per worker": [len(set(re.findall(r"Flow run '([^']*)' - Finished in state Completed", log.read_text())))
                                 for log in logs],
           "log": str(work / "sweep.log")}
    if pool and f"as flow runs of {DEPLOYMENT} ({count} worker(s) online)" not in text:
        row["note"] = "the points did not go to the pool as expected: see the log"
    print(f"[{mode}] {wall:.0f} s, exit {proc.returncode}, {row['finished']} points finished"
          + (f", per worker {row['points per worker']}" if pool else ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="conf/sweep/smoke.yaml")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    args = ap.parse_args()
    base_sweep = (ROOT / args.sweep).resolve()
    if not base_sweep.is_file():
        raise SystemExit(f"--sweep: no such file {base_sweep}")
    n_cores = len(available_cores())
    root = Path(tempfile.mkdtemp(prefix="resrl-sweep-wall-"))
    (root / "prefect").mkdir()
    print(f"{n_cores} cores; sweep {args.sweep}; work folder {root}", flush=True)
    server = Server(root / "prefect")
    rows = []
    try:
        server.setup()
        for mode in args.modes:
            rows.append(run_mode(mode, base_sweep, root, server))
    finally:
        server.close()
    by = {r["mode"]: r for r in rows}
    print("\n| mode | wall | points finished | points per worker |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.0f} s | {r['finished']} | {r['points per worker'] or ''} |"
              + (f" {r['note']}" if r.get("note") else ""))
    for a, b in (("lanes2", "lanes1"), ("pool2", "pool1")):
        if a in by and b in by:
            print(f"{a} / {b}: {by[a]['wall_s'] / by[b]['wall_s']:.2f}x")
    if not args.keep and all(r["rc"] == 0 for r in rows):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs kept in {root}")


if __name__ == "__main__":
    main()
