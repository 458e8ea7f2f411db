"""`resrl` command line.

    resrl train [--config FILE] [key=value ...]
    resrl sweep --config FILE [key=value ...]
    resrl compare SWEEP_ID [--config FILE]
    resrl export-verl OUT_DIR [--config FILE] [key=value ...]

Configs are checked (unknown keys, bad values, model folders) before anything heavy
starts.

This is the one module of the `resrl` package that launches flows: it imports `flows`
and `tasks` (and so Prefect and MLflow), lazily, inside the commands that need them.
Every other resrl module imports without Prefect or MLflow (tests/test_imports.py
checks it). It lives in the package so that `resrl` and `python -m resrl.cli` work
from an installed package.

A user error (resrl.errors.UserError: a bad config, unusable data, a busy run folder,
an unreachable tracking server, ...) is printed as one line, `resrl: error: ...`,
without tracebacks; RESRL_DEBUG=1 keeps Prefect's tracebacks.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from resrl.environment import set_process_defaults
from resrl.errors import UserError

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resrl", description="ResRL experiment workflow (Prefect + MLflow).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one policy (data -> rollouts -> updates -> evaluation)")
    t.add_argument("--config", help="YAML file merged onto conf/default.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.name=grpo trainer.steps=10")
    s = sub.add_parser("sweep", help="run a grid of training runs as one Prefect sweep flow")
    s.add_argument("--config", required=True, help="sweep YAML (see conf/sweep/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every grid point")
    e = sub.add_parser("export-verl", help="write the prepared train/test data as verl RLVR parquet files")
    e.add_argument("out_dir")
    e.add_argument("--config", help="YAML file merged onto conf/default.yaml")
    e.add_argument("overrides", nargs="*")
    c = sub.add_parser("compare", help="rebuild a sweep's comparison report from MLflow")
    c.add_argument("sweep_id")
    c.add_argument("--config", help="a config naming the tracking store (run.tracking_uri / run.output_dir)")
    c.add_argument("overrides", nargs="*")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; key=value words after an option (`export-verl OUT --config F k=v`) are overrides too
    (argparse fills a positional list only once, before the option)."""
    p = _parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _QuietUserErrors(logging.Filter):
    """Drops Prefect's tracebacks of user errors; the CLI prints those as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def _quiet_prefect() -> None:
    import prefect  # noqa: F401 - its logging setup first, then the filters

    if os.environ.get("RESRL_DEBUG") != "1":
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _QuietUserErrors) for f in logger.filters):
                logger.addFilter(_QuietUserErrors())


def _own_temporary_prefect_server() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary API server (uvicorn) on first use.
    Start it here instead, so that it
    - runs in its own session: Ctrl-C reaches only this process, and the flow can still
      record its end (against a server killed by the same Ctrl-C, it retried for minutes);
    - dies with this process, even on kill -9 (PR_SET_PDEATHSIG), instead of lingering.
    Prefect keeps one instance per process, so its own lookups find this one."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return

    from prefect.server.api.server import SubprocessASGIServer

    parent, libc, PR_SET_PDEATHSIG = os.getpid(), ctypes.CDLL(None), 1

    def die_with_parent() -> None:  # in the child before exec: no imports here (other threads may hold locks)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # sent when our main thread (its creator) ends
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    popen = subprocess.Popen

    def owned_popen(*args, **kwargs):
        return popen(*args, start_new_session=True, preexec_fn=die_with_parent, **kwargs)

    subprocess.Popen = owned_popen  # only around Prefect's start of the server
    try:
        SubprocessASGIServer().start()
    except RuntimeError as exc:
        raise UserError(f"Prefect's temporary API server did not start ({str(exc)[:300]}); on a busy machine raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now "
                        f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')}), or start a server "
                        "(bash infra/prefect-server.sh) and set PREFECT_API_URL") from None
    finally:
        subprocess.Popen = popen


def _train(args) -> int:
    from resrl import ranks
    from resrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.trainer.num_processes > 1 and "RANK" not in os.environ:
        # Start the ranks on this machine: torchrun runs this same command in each of them.
        from resrl import cores

        cmd = ranks.launcher_command(cfg.trainer, args.argv)
        print(f"resrl: starting {cfg.trainer.num_processes} data-parallel ranks with torchrun", flush=True)
        return subprocess.call(cmd, env={**os.environ, **cores.launcher_env(cfg.trainer.num_processes)})
    ranks.check_launch(cfg.trainer)
    if cfg.trainer.num_processes > 1:
        from resrl.devices import resolve_device

        ranks.start(resolve_device(cfg.trainer.device))
        if ranks.is_follower():
            from resrl.session import follow

            return follow()  # rank 0 runs the flow, MLflow and the commits; this rank follows it
    try:
        return _train_rank0(args, cfg)
    finally:
        ranks.finish()


def _train_rank0(args, cfg) -> int:
    from resrl.config import run_dir, to_dict
    from flows.train import train_flow
    from tasks.tracking import check_writable_folders, open_store, run_url_hint, tracking_uri

    rdir = run_dir(cfg)
    check_writable_folders(cfg.run)  # before the store, the Prefect server and any data preparation
    open_store(cfg.run)  # an unreachable tracking server fails now, in seconds, before any data preparation
    print(f"resrl: run folder {rdir}  |  MLflow store {tracking_uri(cfg.run)}", flush=True)
    _own_temporary_prefect_server()
    from resrl import interrupts

    try:
        result = train_flow(config=to_dict(cfg))
    except KeyboardInterrupt:
        from resrl.run_state import RunState

        state = RunState.load(rdir)
        if state is not None and state.finished:  # the stop came while Prefect closed the finished flow run
            print(f"\nresrl: interrupted after the run finished; it is complete in {rdir}.", file=sys.stderr)
            return 130
        step = state.step if state else 0
        print(f"\nresrl: interrupted; the run is kept at step {step} in {rdir}: run the same command again "
              "to resume it.", file=sys.stderr)
        return 130
    if interrupts.requested():  # it came while the finished run was being recorded: never a silent exit 0
        print(f"\nresrl: interrupted ({interrupts.requested_signal()}) just as the run finished; it is complete "
              f"in {rdir} (MLflow run {result['mlflow_run_id']}).", file=sys.stderr)
        return 130
    print()
    if result.get("already_finished"):
        print("This run already finished earlier (same config); nothing was re-run. "
              "Start a new one with run.name=... or change the config.")
    else:
        ev = result["final_eval"]
        if ev:
            from resrl.metrics import EVAL_K, avg_key, pass_key

            k = int(ev[EVAL_K])
            print(f"final eval: avg@{k} {ev[avg_key(k)]:.3f} | pass@1 {ev[pass_key(1)]:.3f} | "
                  f"pass@{k} {ev[pass_key(k)]:.3f}")
        t = result["timings"]
        print("time: " + " | ".join(f"{name} {sec:.1f}s" for name, sec in t.items())
              + f" | peak RSS {result['peak_rss_gb']:.2f} GB")
    print(f"run folder:    {result['run_dir']}")
    print(f"MLflow run:    {result['mlflow_run_id']}  (store: {result['tracking_uri']})")
    print(f"see it with:   {run_url_hint(cfg.run, result['mlflow_run_id'])}")
    return 0


def _sweep(args) -> int:
    from flows.sweep import sweep_flow
    from resrl.sweep import load_sweep
    from tasks.tracking import check_writable_folders, open_store, run_url_hint

    sweep = load_sweep(args.config, args.overrides)  # checks every point before anything starts
    check_writable_folders(sweep.points[0].cfg.run)
    open_store(sweep.points[0].cfg.run)  # an unreachable server fails now; a new SQLite store is created once
    print(f"resrl: sweep {sweep.sweep_id}: {len(sweep.points)} points, concurrency {sweep.concurrency}", flush=True)
    result = sweep_flow(sweep_file=args.config, overrides=args.overrides)
    print()
    for p in result["points"]:
        print(f"  {p['status']:<28} {p['run_name']:<22} {p['overrides']}")
    if result["report_dir"] is None:
        print(f"report:        FAILED ({result['report_error']}); the points are unaffected")
    else:
        print(f"report:        {result['report_dir']}/report.md"
              + (f"  (parts failed: {result['report_error']})" if result["report_error"] else ""))
    print(f"MLflow parent: {result['parent_run_id']}  (store: {result['tracking_uri']})")
    print(f"see it with:   {run_url_hint(sweep.points[0].cfg.run)}")
    print(f"rebuild with:  resrl compare {result['sweep_id']}" + (f" --config {args.config}" if args.config else ""))
    return 0 if all(p["status"] == "finished" for p in result["points"]) else 1


def _compare(args) -> int:
    """The report of a sweep, rebuilt from MLflow; --config names the store (a sweep file or a run config)."""
    from resrl.config import load_config
    from resrl.sweep import load_sweep
    from tasks.report import build_report

    from resrl.sweep import read_sweep_file

    spec = read_sweep_file(args.config) if args.config and Path(args.config).is_file() else {}
    if {"grid", "points"} & set(spec or {}):
        cfg = load_sweep(args.config, args.overrides).points[0].cfg  # a sweep file: use its store
    else:
        cfg = load_config(args.config, args.overrides)
    report = build_report(cfg.run, args.sweep_id)
    print(report["markdown"])
    print(f"written to {report['dir']}")
    return 0


def _export_verl(args) -> int:

    from resrl.config import load_config
    from resrl.data import export_verl, load_summary
    from resrl.prepare import prepare_base_and_data

    cfg = load_config(args.config, args.overrides)
    got = prepare_base_and_data(cfg)
    for line in load_summary(got["dataset_dir"]).lines():
        print(f"data: {line}")
    for split, path in export_verl(got["dataset_dir"], Path(args.out_dir)).items():
        print(f"wrote {split}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()  # before anything heavy is imported
    args = _parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command again, for each data-parallel rank
    from resrl import interrupts

    interrupts.install()  # a Ctrl-C swallowed by a destructor is raised again between steps

    try:
        if args.command == "train":
            _quiet_prefect()
            return _train(args)
        if args.command == "export-verl":
            return _export_verl(args)
        if args.command == "sweep":
            from resrl.sweep import load_sweep

            load_sweep(args.config, args.overrides)  # a bad sweep file is one line now, not after Prefect's start
            _quiet_prefect()
            _own_temporary_prefect_server()
            return _sweep(args)
        if args.command == "compare":
            return _compare(args)
    except UserError as exc:
        print(f"resrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nresrl: interrupted.", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
