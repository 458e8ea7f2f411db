"""Parameter sweeps: every grid point is a child flow run of the training flow, trained in
one of `concurrency` lane processes (each point with its own vLLM and DeepSpeed engines),
logging to a child MLflow run under one parent run tagged with the sweep id. When the
points are done, the comparison report (tasks/report.py) goes to the parent run and to
the Prefect flow run. `resrl compare SWEEP_ID` rebuilds the report from MLflow alone.

With a Prefect server (PREFECT_API_URL), the train deployment on it and a worker online on
its pool, the points are instead flow runs of that deployment, taken by every worker of the
pool (`pool_deployment`, `_train_on_pool`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf
from prefect import flow, get_run_logger

from resrl import cores, interrupts
from resrl.config import config_hash, from_dict, run_dir, run_name, to_dict
from resrl.errors import ConfigError
from resrl.run_state import RunState
from resrl.sweep import SweepPoint, load_sweep
from tasks import tracking
from tasks.report import build_report, log_points, register_best, report_failed, start_or_resume_sweep_run


def _point_config(point, sweep_id: str, parent_id: str) -> dict:
    config = to_dict(point.cfg)
    config["run"]["sweep_id"] = sweep_id
    config["run"]["parent_run_id"] = parent_id
    return config


SWEEP_PID_ENV = "RESRL_SWEEP_PID"  # tells a lane which process started it (lane_flow dies with it)
LANE_STOP_GRACE_S = 120.0  # how long a stopped lane may take to mark its point KILLED in MLflow


def lane_env(lane: int, lanes: int) -> dict[str, str]:
    """The environment that gives sweep lane `lane` of `lanes` its own share of this machine's cores
    (resrl/cores.py); empty with RESRL_PIN_CORES=0."""
    if not cores.enabled():
        return {}
    return cores.core_share(lane, lanes, cores.available_cores(), cap=cores.user_thread_cap()).env()


@flow(name="resrl-sweep-lane")
def lane_flow(configs: list[dict], claims_dir: str, slot_limit: str | None = None) -> None:
    """Train sweep points one after another in this process, each as a child flow run.

    A sweep starts `concurrency` lanes; each takes the next point nobody has claimed yet
    (an exclusive file create in `claims_dir`), so lanes balance themselves and a point
    trains once. One process per lane, not per point: the imports (torch, vLLM,
    DeepSpeed, Prefect, MLflow: 20-30 s on 2 cores) and the process start are paid once.
    A point that fails is recorded (FAILED in MLflow, as any run) and the lane goes on.
    With `slot_limit`, each point trains while holding a slot of that Prefect global
    concurrency limit (shared by every sweep on the server). A point's end is marked
    `<key>.done` in `claims_dir`, for the sweep's progress.
    """
    from flows.train import train_flow

    cores.apply_from_env()  # this lane's share of the cores (torch threads, affinity), before any engine
    if os.environ.get(SWEEP_PID_ENV):  # the sweep killed (even by kill -9): this lane stops too
        interrupts.die_with_parent(int(os.environ[SWEEP_PID_ENV]))
    logger = get_run_logger()
    for config in configs:
        key = config_hash(from_dict(config))
        try:
            os.close(os.open(Path(claims_dir) / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # another lane has it
        with _slot(slot_limit, logger):
            state = train_flow(config=config, return_state=True)
        failed = state.is_failed() or state.is_crashed()
        (Path(claims_dir) / f"{key}.done").write_text("failed" if failed else "finished")
        if failed:
            logger.warning("point %s: %s", config["run"].get("name") or key, state.message)
        # a stop signal ends the lane, not only its current point (the training flow returns a
        # state for it, like any failure, and the loop would otherwise take the next point)
        interrupts.check()


@contextmanager
def _slot(limit: str | None, logger):
    """Hold one slot of the Prefect global concurrency limit `limit` (none when None). The slot
    is leased and renewed while held; a lane killed outright frees it when the lease (300 s) ends."""
    if not limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    t0 = time.time()
    with concurrency(limit, occupy=1, strict=True):
        if time.time() - t0 > 1:
            logger.info("got a slot of the concurrency limit '%s' after %.0f s", limit, time.time() - t0)
        yield


def _read_from_server(run_cfg, key: str, read, on_missing):
    """(name, what `read(client, name)` returns) for the name the `run` section's `key` gives, looked up on the
    Prefect server PREFECT_API_URL names (not Prefect's temporary one). None when the key is null or
    no server is named; None after `on_missing(name)` when the server has no such object."""
    from omegaconf import OmegaConf

    name = OmegaConf.select(run_cfg, key)
    if not name or not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return name, read(client, name)
        except ObjectNotFound:
            on_missing(name)
            return None


def slot_limit_for(run_cfg, logger) -> str | None:
    """The global concurrency limit lanes take slots from: the `run` section's concurrency_limit, when
    PREFECT_API_URL names a server and the limit exists there (infra/deploy.sh creates it);
    otherwise None, said in the log."""
    found = _read_from_server(
        run_cfg, "concurrency_limit", lambda client, name: client.read_global_concurrency_limit_by_name(name),
        lambda name: logger.warning("no global concurrency limit '%s' on %s (bash infra/deploy.sh creates it): "
                                    "points train without one", name, os.environ["PREFECT_API_URL"]))
    if found is None:
        return None
    name, limit = found
    logger.info("points take slots of the global concurrency limit '%s' (%d slots, %s)", name, limit.limit,
                "active" if limit.active else "inactive: not limiting")
    return name


class Progress:
    """A sweep's progress: points done out of all (finished earlier, or finished or failed now),
    and the time left at the pace of the points done so far in this sweep. Said in the log and
    kept in the flow run's progress artifact `sweep-progress`, both when the count changes."""

    def __init__(self, sweep_id: str, total: int, done_before: int, logger):
        self.sweep_id, self.total, self.done_before, self.logger = sweep_id, total, done_before, logger
        self.t0 = time.time()
        self.done_now = self.failed = 0
        self.artifact = None

    def line(self) -> str:
        done = self.done_before + self.done_now
        text = f"{done}/{self.total} points done" + (f" ({self.failed} failed)" if self.failed else "")
        left = self.total - done
        if left and self.done_now:
            text += f", about {_duration((time.time() - self.t0) / self.done_now * left)} left"
        elif left:
            text += ", time left: known after the first point"
        return text

    def percent(self) -> float:
        return 100.0 * (self.done_before + self.done_now) / max(self.total, 1)

    def show(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        self.logger.info("sweep %s: %s", self.sweep_id, self.line())
        try:
            if self.artifact is None:
                self.artifact = create_progress_artifact(self.percent(), key="sweep-progress",
                                                         description=f"Sweep {self.sweep_id}: {self.line()}")
            else:
                update_progress_artifact(self.artifact, self.percent(),
                                         description=f"Sweep {self.sweep_id}: {self.line()}")
        except Exception as exc:  # noqa: BLE001 - the log line has it; the sweep goes on
            self.logger.warning("sweep %s: progress artifact not updated (%s)", self.sweep_id, exc)

    def update(self, ended: dict[str, str]) -> None:
        """`ended`: every point that ended so far in this sweep -> "finished" or why not; shown if it changed."""
        if len(ended) != self.done_now:
            self.done_now = len(ended)
            self.failed = sum(v != "finished" for v in ended.values())
            self.show()

    def watch(self, lanes: list, claims: Path, poll_s: float = 5.0) -> None:
        """Wait for the lanes, showing the progress whenever a point ends."""
        self.show()
        while True:
            alive = False
            for lane in lanes:
                lane.join(timeout=0 if alive else poll_s)
                alive = alive or lane.is_alive()
            self.update({f.stem: f.read_text() for f in claims.glob("*.done")})
            if not alive:
                return


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@flow(name="resrl-sweep")
def sweep_flow(sweep_file: str, overrides: list[str] | None = None) -> dict:
    """Train every point of the sweep in `sweep_file` (skipping finished ones) and report."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    sweep = load_sweep(sweep_file, overrides or [])
    run_cfg = sweep.points[0].cfg.run  # the store (one for all points) and the report's output_dir
    stores = {tracking.tracking_uri(p.cfg.run) for p in sweep.points}
    if len(stores) > 1:
        raise ConfigError(f"all points of a sweep must log to one MLflow store, got {sorted(stores)}")
    # Create the store (and its schema) once, before parallel runs touch it.
    parent_id = start_or_resume_sweep_run(run_cfg, sweep.sweep_id, sweep.spec)
    logger.info("sweep %s: %d points, concurrency %d, MLflow parent run %s", sweep.sweep_id, len(sweep.points),
                sweep.concurrency, parent_id)

    status: dict[str, str] = {}
    pending = []
    for p in sweep.points:
        if _finished(p):
            status[p.key] = "finished"
            logger.info("point %s (%s): finished earlier, skipped", p.label(()), run_name(p.cfg))
        else:
            pending.append(p)
    configs = [_point_config(p, sweep.sweep_id, parent_id) for p in pending]
    progress = Progress(sweep.sweep_id, len(sweep.points), len(sweep.points) - len(pending), logger)
    deployment = pool_deployment(run_cfg, logger) if pending else None
    if deployment:  # every worker of the pool takes points
        ended = _train_on_pool(deployment, pending, configs, sweep.sweep_id, progress, logger)
        for p in pending:
            status[p.key] = "finished" if _finished(p) else ended.get(p.key, "not started")
            logger.info("point %s: %s", p.label(()), status[p.key])
    else:
        _train_in_lanes(sweep, pending, configs, status, progress, logger)

    swept = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
    points = [_point_record(p, swept, status[p.key]) for p in sweep.points]
    log_points(run_cfg, parent_id, points)
    report = make_report(run_cfg, sweep.sweep_id, parent_id, logger)
    try:
        create_markdown_artifact(report["markdown"], key="sweep-report", description=f"Sweep {sweep.sweep_id}")
    except Exception as exc:  # noqa: BLE001 - the report is in MLflow and on disk already
        logger.warning("sweep %s: the report's Prefect artifact was not created (%s)", sweep.sweep_id, exc)
    finished = sum(s == "finished" for s in status.values())
    tracking.finish_run(run_cfg, parent_id, status="FINISHED" if finished == len(points) else "FAILED")
    return {"sweep_id": sweep.sweep_id, "parent_run_id": parent_id, "points": points,
            "report_dir": report["dir"], "report_error": report["error"],
            "tracking_uri": tracking.tracking_uri(run_cfg)}


def _train_in_lanes(sweep, pending: list, configs: list[dict], status: dict, progress, logger) -> None:
    """The pending points in `concurrency` lane processes of this machine; fills `status`."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_in_subprocess

    # children report to this flow's API (the temporary server too, when there is no PREFECT_API_URL)
    child_env = {"PREFECT_API_URL": str(get_client(sync_client=True).api_url).rstrip("/"),
                 SWEEP_PID_ENV: str(os.getpid())}
    claims = Path(tempfile.mkdtemp(prefix=f"resrl-{sweep.sweep_id}-"))
    slot_limit = slot_limit_for(sweep.points[0].cfg.run, logger) if pending else None
    n_lanes = min(sweep.concurrency, len(pending))
    if n_lanes > 1:
        build_shared_caches(configs, logger)
    lanes = []
    for i in range(n_lanes):
        env = {**child_env, **lane_env(i, n_lanes)}
        with cores.environ(env):  # inherited from the lane's first instruction (its OpenMP runtime reads it at start)
            lanes.append(run_flow_in_subprocess(lane_flow, env=env, parameters={
                "configs": configs, "claims_dir": str(claims), "slot_limit": slot_limit}))
        if env.get("RESRL_CORES"):
            logger.info("lane %d: cores %s, %s threads", i, env["RESRL_CORES"], env["OMP_NUM_THREADS"])
    logger.info("%d points to train in %d lane process(es)", len(pending), len(lanes))
    try:
        progress.watch(lanes, claims)
    except BaseException:  # Ctrl-C, SIGTERM (KeyboardInterrupt, Prefect's TerminationSignal), or a bug
        stop_lanes(lanes, logger)
        shutil.rmtree(claims, ignore_errors=True)
        raise
    for p in pending:
        if _finished(p):
            status[p.key] = "finished"
        else:
            status[p.key] = "failed" if (claims / p.key).exists() else "not started (its lane died)"
        logger.info("point %s: %s", p.label(()), status[p.key])
    shutil.rmtree(claims, ignore_errors=True)


def build_shared_caches(configs: list[dict], logger) -> None:
    """Build the cache entries the points share (base model, dataset, warm-start) here, on every
    core of the sweep, before the lanes start. Otherwise the first lane builds them on its share
    of the cores while the other lanes wait for it (the cache lock): on 2 cores a cold smoke
    sweep's warm-start took 150 s in two lanes against 98 s in one. Each distinct set of cache
    entries (`resrl.prepare.shared_work`) is prepared once; a bad dataset or model fails the sweep
    here, before any lane starts."""
    from resrl.prepare import prepare, shared_work  # torch and transformers: only when lanes need it

    seen = set()
    for config in configs:
        deps = shared_work(config)
        if deps in seen:
            continue
        seen.add(deps)
        t0 = time.time()
        got = prepare(from_dict(config), progress=True)
        warm = "warm-start (published copy)" if got.get("warmstart_source") == "published" else "warm-start"
        built = [name for name, reused in (("data", got["data_reused"]), (warm, got["warmstart_reused"]))
                 if reused is False]
        logger.info("shared cache entries %s (%.0f s, all cores): %s", "built: " + ", ".join(built) if built
                    else "reused", time.time() - t0, got["policy_dir"])


def stop_lanes(lanes: list, logger, grace_s: float = LANE_STOP_GRACE_S) -> None:
    """Pass a stop on to the lanes still running: SIGTERM, which ends each lane's point as a stop
    ends any run (MLflow run KILLED, resumable), then wait up to `grace_s`; a lane still alive
    then, or every lane when a second stop comes while waiting, is killed. Returns when none is
    left, so the sweep never exits while a lane trains on."""
    alive = [lane for lane in lanes if lane.is_alive()]
    if not alive:
        return
    logger.warning("stopping %d lane process(es): their points end as KILLED and resume on the next run",
                   len(alive))
    for lane in alive:
        lane.terminate()
    deadline = time.monotonic() + grace_s
    try:
        for lane in alive:
            lane.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:  # the grace ran out, or a second Ctrl-C / SIGTERM came while waiting
        for lane in alive:
            if lane.is_alive():
                logger.warning("lane process %s did not stop in time: killed", lane.pid)
                lane.kill()
                lane.join()


def pool_deployment(run_cfg, logger) -> str | None:
    """The deployment to submit a sweep's points to (the `run` section's sweep_deployment, `resrl-train/train`):
    when PREFECT_API_URL names a server, the deployment is there and its work pool has a worker
    online. Otherwise None (the points train in lanes here), said in the log."""
    found = _read_from_server(
        run_cfg, "sweep_deployment", lambda client, name: client.read_deployment_by_name(name),
        lambda name: logger.info("no deployment %s on the server (bash infra/deploy.sh): points train in lanes "
                                 "here", name))
    if found is None:
        return None
    name, deployment = found
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # a pool that is missing is an error, not "no deployment"
        workers = client.read_workers_for_work_pool(deployment.work_pool_name)
    online = [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]
    if not online:
        logger.info("no worker online on work pool %s (bash infra/worker.sh): points train in lanes here",
                    deployment.work_pool_name)
        return None
    logger.info("points go to work pool %s as flow runs of %s (%d worker(s) online)", deployment.work_pool_name, name,
                len(online))
    return name


def _train_on_pool(deployment: str, pending: list, configs: list[dict], sweep_id: str, progress, logger,
                   poll_s: float = 10.0) -> dict[str, str]:
    """Each pending point as a flow run of `deployment` (a child of this flow run), taken by
    whichever worker of its pool is free; waits for them all. Returns {point key: "finished" |
    the final state's name, lower case}. A point a worker finished is "finished" through its
    run folder or the tracking store (see `_finished`)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    runs = {}
    for p, config in zip(pending, configs):
        submitted = run_deployment(deployment, parameters={"config": config}, timeout=0, as_subflow=True,
                                   flow_run_name=f"{sweep_id}/{run_name(p.cfg)}", tags=["resrl-sweep-point"],
                                   idempotency_key=f"{flow_run.id}-{p.key}")  # once per sweep flow run
        runs[p.key] = submitted.id
    logger.info("%d points submitted to the work pool", len(runs))
    ended: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        progress.show()
        try:
            while len(ended) < len(runs):
                time.sleep(poll_s)
                for key, run_id in runs.items():
                    state = client.read_flow_run(run_id).state if key not in ended else None
                    if state is not None and state.is_final():
                        ended[key] = "finished" if state.is_completed() else state.name.lower()
                progress.update(ended)
        except BaseException:  # Ctrl-C, SIGTERM, an API error: the points of this sweep stop too
            from prefect.states import Cancelled, Cancelling

            for key, run_id in runs.items():
                if key not in ended:
                    running = client.read_flow_run(run_id).state.is_running()
                    client.set_flow_run_state(run_id, Cancelling() if running else Cancelled(), force=True)
            logger.warning("sweep %s stopped: its unfinished points' flow runs are cancelled", sweep_id)
            raise
    return ended


def make_report(run_cfg, sweep_id: str, parent_id: str, logger) -> dict:
    """The sweep's report (from and to the `run` section's store and output_dir), never fatal to the
    sweep: an error is logged on the parent MLflow run (`resrl.report=failed` + `resrl.report_error`)
    and said in the log, and the sweep's outcome is that of its points. Returns {"dir", "markdown",
    "error"} ("dir" None when nothing was written)."""
    try:
        report = build_report(run_cfg, sweep_id)
    except Exception as exc:  # noqa: BLE001 - the points' runs are done; the report can be rebuilt
        try:
            error = report_failed(run_cfg, parent_id, exc)
        except Exception:  # noqa: BLE001 - the store itself is the problem: say so in the log
            error = f"{type(exc).__name__}: {exc}"
        logger.error("sweep %s: the report failed (%s); the points are unaffected. Rebuild it with "
                     "`resrl compare %s`.", sweep_id, error, sweep_id, exc_info=True)
        return {"dir": None, "error": error,
                "markdown": f"# Sweep {sweep_id}\n\nThe report failed: `{error}`. Rebuild it with "
                            f"`resrl compare {sweep_id}`.\n"}
    if report["errors"]:
        logger.warning("sweep %s: report parts failed: %s", sweep_id, "; ".join(report["errors"]))
    try:
        best = register_best(run_cfg, report, sweep_id)
        if best:
            logger.info("sweep %s: best point %s (%s %.3f) registered as models:/%s@best, version %s", sweep_id,
                        best["run_name"], report["headline"], best["value"], best["name"], best["version"])
    except Exception as exc:  # noqa: BLE001 - the report stands without it
        logger.warning("sweep %s: the best point's model was not registered (%s: %s)", sweep_id,
                       type(exc).__name__, exc)
    return {"dir": report["dir"], "markdown": report["markdown"],
            "error": "; ".join(f"{k}: {v}" for k, v in report["errors"].items()) or None}


def _finished(point: SweepPoint) -> bool:
    """Finished in its run folder here, or (trained on another machine's worker) a FINISHED run
    of its config hash in the tracking store."""
    state = RunState.load(run_dir(point.cfg))
    return (state is not None and state.finished) or _store_run(point, finished=True) is not None


def _store_run(point: SweepPoint, finished: bool = False):
    """The newest MLflow run of this point's config (tag resrl.config_hash), FINISHED ones only with `finished`."""
    query = f"tags.`resrl.config_hash` = '{point.key}'" + (" and attributes.status = 'FINISHED'" if finished else "")
    found = tracking.search_runs(point.cfg.run, query, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _point_record(point: SweepPoint, swept: list[str], status: str) -> dict:
    """What points.json says about one point: the report reads it back from MLflow."""
    state = RunState.load(run_dir(point.cfg))
    run_id = state.mlflow_run_id if state else None
    if run_id is None:  # trained by a worker on another machine: its run in the store
        found = _store_run(point, finished=status == "finished") or _store_run(point)
        run_id = found.info.run_id if found else None
    return {"key": point.key, "overrides": point.overrides, "run_name": run_name(point.cfg),
            "values": {k: OmegaConf.select(point.cfg, k) for k in swept},
            "run_dir": str(run_dir(point.cfg)), "mlflow_run_id": run_id, "status": status}
